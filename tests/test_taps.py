"""Taps: captures by forward hooks, module paths, dry runs and the module table, tap keys."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill.errors import RecipeError
from kdistill.taps import (
    Taps,
    TapSpec,
    dry_run,
    expand_layers,
    layer_map,
    module_tree,
    resolve_paths,
    tap_key,
)


class Block(nn.Module):
    """Returns a tuple (features, per-sample sum), as many library blocks do."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.linear(x))
        return h, h.sum(-1)


class Scale(nn.Module):
    """Called with a keyword argument."""

    def forward(self, x: torch.Tensor, *, factor: float = 2.0) -> torch.Tensor:
        return x * factor


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.blocks = nn.ModuleDict({"a": Block(8), "b": Block(8)})
        self.scale = Scale()
        self.shared = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h, _ = self.blocks["a"](h)
        h, _ = self.blocks["b"](h)
        h = self.scale(x=h)
        h = self.shared(self.shared(h))
        return self.head(h)


def reference(net: Net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The intermediate tensors of Net, computed by hand."""
    stem = net.stem[2](torch.relu(net.stem[0](x)))
    a = torch.tanh(net.blocks["a"].linear(stem))
    b = torch.tanh(net.blocks["b"].linear(a))
    scaled = 2 * b
    shared = net.shared(net.shared(scaled))
    return {"stem": stem, "a": a, "b": b, "scaled": scaled, "head_in": shared}


class Wrapper(nn.Module):
    """Stands for DistributedDataParallel: the model sits at attribute `module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.module(*args, **kwargs)


@pytest.fixture()
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture()
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(5, 4)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------- capture


def test_captures_outputs_inputs_and_tuple_items(net: Net, x: torch.Tensor) -> None:
    specs = [
        "stem",
        "stem.0",
        TapSpec("blocks.a"),  # tuple output: first tensor
        TapSpec("blocks.b", index=1),
        TapSpec("head", which="input"),
        TapSpec("scale", which="input"),  # only a keyword argument: first tensor kwarg
        TapSpec("scale", which="input", index="x"),
    ]
    with Taps(net, specs, where="student") as taps:
        out = net(x)
        got = taps.values()
    ref = reference(net, x)
    assert list(got) == [
        "stem",
        "stem.0",
        "blocks.a",
        "blocks.b:output[1]",
        "head:input",
        "scale:input",
        "scale:input[x]",
    ]
    torch.testing.assert_close(got["stem"], ref["stem"])
    torch.testing.assert_close(got["stem.0"], net.stem[0](x))
    torch.testing.assert_close(got["blocks.a"], ref["a"])
    torch.testing.assert_close(got["blocks.b:output[1]"], ref["b"].sum(-1))
    torch.testing.assert_close(got["head:input"], ref["head_in"])
    torch.testing.assert_close(got["scale:input"], ref["b"])
    torch.testing.assert_close(got["scale:input[x]"], ref["b"])
    torch.testing.assert_close(out, net.head(ref["head_in"]))


def test_gradient_flows_to_student_through_captured_feature(net: Net, x: torch.Tensor) -> None:
    target = torch.randn(5, 8)
    with Taps(net, ["blocks.a"]) as taps:
        net(x)
        loss = F.mse_loss(taps["blocks.a"], target)
    loss.backward()
    got = [p.grad.clone() for p in net.stem.parameters()]
    assert all(g.abs().sum() > 0 for g in got)
    assert net.head.weight.grad is None  # the feature loss does not reach the head

    net.zero_grad(set_to_none=True)
    F.mse_loss(reference(net, x)["a"], target).backward()
    for g, p in zip(got, net.stem.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_teacher_captures_under_inference_mode_enter_student_loss(
    net: Net, x: torch.Tensor
) -> None:
    torch.manual_seed(2)
    student = nn.Linear(4, 8)
    taps = Taps(net, ["stem"], where="teacher").attach()
    with torch.inference_mode():
        net(x)
    teacher_feature = taps["stem"]
    assert not teacher_feature.is_inference()
    F.mse_loss(student(x), teacher_feature).backward()  # would fail on an inference tensor
    assert student.weight.grad is not None
    taps.remove()


def test_hf_style_outputs_take_last_hidden_state_or_first_tensor() -> None:
    @dataclasses.dataclass
    class Output:
        logits: torch.Tensor
        last_hidden_state: torch.Tensor

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(3, 6)
            self.mapping = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(x)
            self.mapping(OrderedDict(loss=None, scores=hidden * 3, extra=hidden))
            return Output(logits=hidden.sum(-1), last_hidden_state=hidden)  # type: ignore[return-value]

    class Top(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x).logits

    top, x = Top(), torch.randn(2, 3)
    specs = [
        "model",
        TapSpec("model", index="logits"),
        TapSpec("model", index=0),
        "model.mapping",
        TapSpec("model.mapping", index=1),
    ]
    with Taps(top, specs) as taps:
        top(x)
        got = taps.values()
    hidden = top.model.encoder(x)
    torch.testing.assert_close(got["model"], hidden)
    torch.testing.assert_close(got["model:output[logits]"], hidden.sum(-1))
    torch.testing.assert_close(got["model:output[0]"], hidden.sum(-1))
    torch.testing.assert_close(got["model.mapping"], hidden * 3)  # first tensor; None skipped
    torch.testing.assert_close(got["model.mapping:output[1]"], hidden)


def test_transformers_model_output_gives_last_hidden_state() -> None:
    outputs = pytest.importorskip("transformers.modeling_outputs")

    class Encoder(nn.Module):
        def forward(self, x: torch.Tensor) -> object:
            return outputs.BaseModelOutputWithPooling(
                last_hidden_state=x + 1, pooler_output=x[:, 0]
            )

    class Top(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = Encoder()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.encoder(x).pooler_output

    top, x = Top(), torch.randn(2, 3, 4)
    with Taps(top, ["encoder", TapSpec("encoder", index="pooler_output")]) as taps:
        top(x)
        torch.testing.assert_close(taps["encoder"], x + 1)
        torch.testing.assert_close(taps["encoder:output[pooler_output]"], x[:, 0])


def test_bad_index_raises_with_the_tap_named(net: Net, x: torch.Tensor) -> None:
    specs = [
        TapSpec("blocks.a", index=5),
        TapSpec("stem", index=0),
        TapSpec("head", which="input", index="y"),
    ]
    with Taps(net, specs, where="student") as taps:
        net(x)
        with pytest.raises(RecipeError) as info:
            taps.values()
    message = str(info.value)
    assert "'blocks.a'" in message and "out of range for 2 items" in message
    assert "'stem'" in message and "single tensor" in message
    assert "'head'" in message and "'y'" in message
    with pytest.raises(RecipeError, match="'which' parameter"):
        TapSpec("stem", which="outptu")  # type: ignore[arg-type]


def test_captures_cleared_at_each_call_and_by_clear(net: Net, x: torch.Tensor) -> None:
    with Taps(net, ["stem"]) as taps:
        with pytest.raises(RecipeError, match="no forward pass"):
            taps.values()
        net(x)
        first = taps["stem"]
        x2 = x + 1
        net(x2)  # a new call of the model starts afresh: no "ran 2 times"
        torch.testing.assert_close(taps["stem"], reference(net, x2)["stem"])
        assert not torch.equal(first, taps["stem"])
        taps.clear()
        with pytest.raises(RecipeError, match="no forward pass"):
            taps.values()


def test_shared_module_raises_with_call_count(net: Net, x: torch.Tensor) -> None:
    with Taps(net, ["shared"], where="student") as taps:
        net(x)
        with pytest.raises(
            RecipeError, match=r"student: output of 'shared' \(Linear\).*ran 2 times"
        ):
            taps.values()


def test_in_place_change_after_capture_is_detected_and_clone_keeps_value() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(inplace=True), nn.Linear(16, 2))
    x = torch.randn(8, 4)
    pre_relu = model[0](x)
    assert (pre_relu < 0).any()
    with Taps(model, ["0"]) as taps:
        model(x)
        with pytest.raises(RecipeError, match=r"changed in place.*clone"):
            taps["0"]
    with Taps(model, [TapSpec("0", clone=True), TapSpec("1", which="input", clone=True)]) as taps:
        model(x)
        torch.testing.assert_close(taps["0"], pre_relu)
        torch.testing.assert_close(taps["1:input"], pre_relu)


def test_remove_leaves_no_hooks_and_output_unchanged(net: Net, x: torch.Tensor) -> None:
    before = net(x)
    taps = Taps(net, ["stem", TapSpec("head", which="input")]).attach()
    taps.attach()  # idempotent
    torch.testing.assert_close(net(x), before)
    assert taps.values()
    taps.remove()
    assert no_hooks(net)
    assert not taps.attached
    torch.testing.assert_close(net(x), before)
    with pytest.raises(RecipeError, match="no forward pass"):
        taps.values()  # nothing captured after removal
    taps.remove()  # idempotent


def test_ddp_style_module_prefix(net: Net, x: torch.Tensor) -> None:
    wrapped = Wrapper(net)
    assert resolve_paths(wrapped, ["module.stem", "blocks.a"], "student") == ["stem", "blocks.a"]
    assert resolve_paths(net, ["module.stem"], "student") == ["stem"]
    with Taps(wrapped, ["module.stem", TapSpec("module.head", which="input")]) as taps:
        wrapped(x)
        got = taps.values()
        assert list(got) == ["stem", "head:input"]
        torch.testing.assert_close(taps["module.stem"], reference(net, x)["stem"])
        torch.testing.assert_close(got["head:input"], reference(net, x)["head_in"])
    assert no_hooks(wrapped)
    assert dry_run(wrapped, x, ["module.stem"]) == {"stem": (5, 8)}
    assert expand_layers(wrapped, "module.blocks.*") == ["blocks.a", "blocks.b"]


# ---------------------------------------------------------------- validation and dry runs


def test_wrong_paths_raise_once_with_close_names(net: Net) -> None:
    with pytest.raises(RecipeError) as info:
        resolve_paths(net, ["stem.0", "blocks.c", "stme", "nothing_like_it_at_all"], "student")
    message = str(info.value)
    assert message.count("student: no module named") == 3
    assert "'blocks.c'" in message and "'blocks.a'" in message
    assert "'stme'" in message and "'stem'" in message
    assert "Top-level modules" in message  # nothing close: list the top level
    assert "kdistill inspect MODEL" in message
    with pytest.raises(RecipeError, match=r"'blocks' is a ModuleDict.*'blocks\.a'"):
        resolve_paths(net, ["blocks"], "student")
    with pytest.raises(RecipeError, match="no module named 'stme'"):
        Taps(net, ["stme"])


def test_dry_run_shapes_and_never_called_module(net: Net, x: torch.Tensor) -> None:
    shapes = dry_run(net, x, ["stem", "blocks.b", TapSpec("head", which="input")])
    assert shapes == {"stem": (5, 8), "blocks.b": (5, 8), "head:input": (5, 8)}
    assert no_hooks(net)
    with pytest.raises(RecipeError) as info:
        dry_run(net, x, ["unused", "shared", "stem"], where="teacher")
    message = str(info.value)
    assert "teacher: output of 'unused' (Linear)" in message
    assert "did not run" in message and "branch not taken" in message
    assert "'shared'" in message and "ran 2 times" in message
    assert "'stem'" not in message
    assert no_hooks(net)

    every = dry_run(net, x)
    assert every["head"] == (5, 3) and every["blocks.a"] == (5, 8) and every[""] == (5, 3)
    assert "unused" not in every and "blocks" not in every


def test_dry_run_keeps_batchnorm_statistics_and_mode() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = torch.randn(2, 3, 6, 6)
    assert dry_run(model, batch, ["1"]) == {"1": (2, 4, 6, 6)}
    module_tree(model, batch)
    assert model.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key])
    model(batch)  # a real training pass does change them
    assert not torch.equal(model[1].running_mean, state["1.running_mean"])


def test_dry_run_passes_mapping_and_tuple_batches() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 2)

        def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.proj(input_ids * mask)

    model, a, m = TwoInputs(), torch.randn(4, 3), torch.ones(4, 3)
    assert dry_run(model, {"input_ids": a, "mask": m}, ["proj"]) == {"proj": (4, 2)}
    assert dry_run(model, (a, m), ["proj"]) == {"proj": (4, 2)}


def test_module_tree_lists_classes_params_and_shapes(net: Net, x: torch.Tensor) -> None:
    tree = module_tree(Wrapper(net), x)
    lines = tree.splitlines()
    assert lines[0].split() == ["module", "class", "params", "output"]
    row = {line.split()[0]: line for line in lines[1:]}
    total = sum(p.numel() for p in net.parameters())
    assert row["(model)"].split()[:3] == ["(model)", "Net", f"{total:,}"]
    assert row["stem.0"].split()[1:3] == ["Linear", "40"]
    assert "(5, 8)" in row["stem.0"]
    assert row["stem.0"].startswith("    stem.0")  # depth 2
    assert "(5, 8) (tuple)" in row["blocks.a"]
    assert "not called" in row["unused"]
    assert "container" in row["blocks"]
    assert "×2" in row["shared"]
    assert "(5, 3)" in row["head"]

    shallow = module_tree(net, x, max_depth=1)
    assert "stem.0" not in shallow and "blocks.a.linear" not in shallow
    assert "7 deeper modules not shown (max_depth=1)" in shallow
    assert "output" not in module_tree(net).splitlines()[0]


# ---------------------------------------------------------------- patterns and keys


def test_expand_layers_orders_stars_and_integers() -> None:
    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(12))
            for i in (10, 2, 1):  # registered out of numeric order
                self.add_module(f"layer{i}", nn.Linear(2, 2))

    stack = Stack()
    assert expand_layers(stack, "layers.*") == [f"layers.{i}" for i in range(12)]
    assert expand_layers(stack, "layers.{i}") == [f"layers.{i}" for i in range(12)]
    assert expand_layers(stack, "layer{i}") == ["layer1", "layer2", "layer10"]
    assert expand_layers(stack, "layer*") == ["layer10", "layer2", "layer1"]  # registration order
    assert expand_layers(stack, "layer2") == ["layer2"]
    with pytest.raises(RecipeError, match=r"'encoder\.layer\.\*' matches no module.*'layers\.0'"):
        expand_layers(stack, "encoder.layer.*", where="teacher")
    pairs = layer_map(expand_layers(stack, "layer{i}"), expand_layers(stack, "layers.*"))
    assert pairs == [("layer1", "layers.3"), ("layer2", "layers.7"), ("layer10", "layers.11")]


def test_tap_key() -> None:
    assert tap_key("a.b") == "a.b"
    assert tap_key("a", "input") == "a:input"
    assert tap_key("a", "output", 1) == "a:output[1]"


def test_tap_spec_parse_round_trips_tap_key(net: Net, x: torch.Tensor) -> None:
    for spec in [
        TapSpec("a.b"),
        TapSpec("a", "input"),
        TapSpec("a", "output", 1),
        TapSpec("a", "input", "hidden_states"),
        TapSpec("a", "output", -1),
    ]:
        assert TapSpec.parse(tap_key(spec.path, spec.which, spec.index)) == spec
    with pytest.raises(RecipeError, match="Cannot read the tap 'a:inptu'"):
        TapSpec.parse("a:inptu")
    with Taps(net, ["head:input", "blocks.b:output[1]"]) as taps:
        net(x)
        torch.testing.assert_close(taps["head:input"], reference(net, x)["head_in"])
        torch.testing.assert_close(taps["blocks.b:output[1]"], reference(net, x)["b"].sum(-1))
