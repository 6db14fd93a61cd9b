"""Any VLM through the loop: a zoo of real architectures built offline, and the tool-image contract check.

- :mod:`medgym.models.zoo`: ``medgym model init --arch ARCH`` (random weights, a trained tokenizer,
  a tool chat template);
- :mod:`medgym.models.contract_check`: ``medgym check --model DIR [--fix OUT]``.
"""
