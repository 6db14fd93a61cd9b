"""Evaluation over recorded traces: replay's re-run half and the SFT export's prompts.

It sits above ``environments`` (it rebuilds cases and runs tools) so that ``traces`` stays the
pure bottom layer.
"""
