"""The io layer: every checkpoint format, read and written.

- :mod:`.registry`: the one table of formats (``open`` and the writers look them up);
- a module per format: :mod:`.safetensors_format` (one file, shards), :mod:`.torch_format`
  (one ``torch.save`` file, ``pytorch_model-*.bin`` shards), :mod:`.dcp_reader` /
  :mod:`.dcp_writer` (DCP, its safetensors layout, Megatron / NeMo 2, ``.nemo``), and
  :mod:`.hf` / :mod:`.hf_config` (Hugging Face model folders);
- :mod:`.targets`: the output-target rules (format from the name, folders, protected
  inputs, atomic commit, carried files); :mod:`.options`: ``WriteOptions``,
  ``SaveResult``, the ``Collective`` a process group implements;
- the parsers and writers they share: :mod:`.sniff`, :mod:`.safetensors`, :mod:`.sharded`,
  :mod:`.pickles`, :mod:`.writer`, :mod:`.sharded_writer`, :mod:`.torch_writer`, ...
"""
