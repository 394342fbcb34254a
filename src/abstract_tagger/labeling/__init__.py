"""Weak labelling: labelling functions (`functions`), sentence embeddings (`embedding`), label models
(`label_model`), the report (`report`), and the run that ties them together (`weak_labels`).

Kept empty so that importing one part (prediction imports the rule functions) does not import the
others and their heavy dependencies.
"""
