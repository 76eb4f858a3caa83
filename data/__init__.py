"""Kiln's data layer: it knows nothing of the model or the trainer.

tokenizer_base.py                         the Tokenizer interface, special-token names, the byte tokenizer
spm.py, hf_tokenizer.py                   the sentencepiece and tokenizer.json backends
tokenizer.py                              load / resolve a tokenizer (the module callers import)
chat.py                                   chat templates: conversation -> ids + assistant loss mask
synthetic.py                              built-in arithmetic word problems, answer extraction, verifier
sources.py                                config source entries -> records (text, jsonl, array_record, ...)
examples.py                               records -> token examples, with the over-length policy
pipeline.py                               grain pipelines: train_iterator, eval_iterator
loader.py                                 host batches -> global jax arrays on a mesh
stats.py                                  kept / truncated / dropped counts and padding, for previews
"""
