"""Token classification (`task: token_classification`): a label per word, as in
named-entity recognition. data.py reads and checks CoNLL files and aligns words to each
model's tokens; models.py builds taggers; steps.py trains and measures (entity F1 with
seqeval); pipeline.py runs the stages; report.py writes the results."""
