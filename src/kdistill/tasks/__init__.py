"""The tasks: what differs between classification and causal language modelling.

Each task module holds exactly the differences `fit` and the stages must not know:
how rows become a batch, forward + loss given the teacher's signal, what the loss is
divided by (samples or counted tokens), the validation score and its direction.
Everything else (the loop, checkpoints, resume, metrics) is `kdistill.train.fit`.
"""
