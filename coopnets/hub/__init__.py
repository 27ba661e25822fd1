"""Hub I/O: the checkpoint format, where checkpoints live, saving, publishing, loading, cards, the zoo manifest.

One module per job:

* :mod:`.format` -- file names, ``config.json`` (built, parsed, older versions upgraded), :class:`CheckpointError`;
* :mod:`.location` -- :class:`HubLocation`, the one parsed form of ``hf-hub:``/``local-dir:`` names, and downloads;
* :mod:`.save` -- :func:`save_pretrained`, :func:`push_to_hub`, the one safetensors writer;
* :mod:`.load` -- :func:`create_from_hub`, :func:`load_pretrained`;
* :mod:`.card` -- the model card; :mod:`.manifest` -- the zoo's published tags;
* :mod:`.transformers_compat` -- transformers reads checkpoints of older formats too (installed here).
"""
from .format import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, checkpoint_config
from .load import create_from_hub, load_pretrained, read_config
from .location import HubLocation
from .save import push_to_hub, save_pretrained, write_safetensors
from .transformers_compat import install as _install_transformers_upgrade

_install_transformers_upgrade()

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "CheckpointError", "HubLocation", "checkpoint_config", "create_from_hub",
    "load_pretrained", "push_to_hub", "read_config", "save_pretrained", "write_safetensors",
]
