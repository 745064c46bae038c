"""Sequence-to-sequence distillation (`task: seq2seq`): translation with Hugging Face
encoder-decoders; word-level KD, sequence-level KD (the teacher's beam translations),
shrink-and-fine-tune students; BLEU and chrF with sacrebleu."""
