"""Stage 1, the data: corpus readers (every input format as one stream of papers, with every record
accounted for), the hand-labelled gold sets and the taxonomy. Imports common only."""
