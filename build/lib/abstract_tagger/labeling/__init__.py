"""Stage 2, weak labels: labelling functions vote per tag, a label model turns the votes into soft
targets, with a report per function; the rule blend that prediction mixes in. Imports common, metrics
and data.

Kept empty, so that importing one part (prediction imports the rule functions) does not import the
others and their heavy dependencies.
"""
