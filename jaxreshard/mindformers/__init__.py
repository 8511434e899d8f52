"""The MindFormers shim layer: MindFormers' conversion entry points on top of the library API.

It sits above everything else and nothing in the package imports it (only `jaxreshard/__init__.py`, which
re-exports `auto_convert`, and the commands layer): MindFormers' names, flags and quirks stay here.
- `auto`: `auto_convert` / `auto_convert_from_config`, MindFormers' `auto_trans_ckpt` on one or many nodes;
- `scope`: which ranks and nodes take part (MindFormers' environment variables);
- `reuse`: a previous run's output adopted instead of converting again;
- `compat`: the offline scripts' semantics (`tools/transform_checkpoint.py`, `transform_ckpt_lora.py`,
  `unified_safetensors.py` are thin drop-ins over it).
"""
