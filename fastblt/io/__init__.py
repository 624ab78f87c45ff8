"""What goes to and comes from disk: training checkpoints, the inference export, Hugging Face
conversion, and loading parameters for inference.

Modules:

    checkpoint.py       Orbax checkpoints: state + grain iterator + config, preemption, retention,
                        resuming past an unreadable step
    workdir_lock.py     one trainer per workdir (an flock'ed holder record)
    export.py           the inference checkpoint format (config.json + Orbax params/)
    loading.py          (config, params) from an export or a training workdir (parameters only: no
                        optimizer is built, its values are not read)
    huggingface.py      Hugging Face BltForCausalLM <-> fastblt parameters and configs
    export_command.py   ``fastblt export``;  convert_command.py: ``fastblt convert``
"""
