"""Datasets in Megatron's .bin/.idx format, tokenizers, GPT samples and blends.

Importable without torch: the preprocessing path needs only numpy, the tokenizer
libraries and the native module.
"""
