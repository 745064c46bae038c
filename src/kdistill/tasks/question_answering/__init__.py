"""Extractive question answering (`task: question_answering`) on SQuAD-format files:
data.py reads, checks and windows the questions; steps.py trains, decodes spans and
scores EM/F1; pipeline.py describes the task to the encoder-task run; report.py
writes the results."""
