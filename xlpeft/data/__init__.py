"""Data: corpora for language modules (MLM blocks), labelled task data, collators."""
