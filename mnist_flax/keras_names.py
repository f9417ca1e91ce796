"""MobileNetV2's Keras layer names: every weighted layer in network order, where each sits in the
NNX model, and which unit of the network holds it.

The one list of names the rest reads: `config.py` (what --fine-tune-from may name), the converter
(which Keras array goes where), the model (`MobileNetV2.keras_layers`), freezing and the feature
cache's key. It imports neither JAX nor TensorFlow, so that `config.py` can use it before they load.

    Keras layer name                 NNX path                   unit
    Conv1, bn_Conv1                  Conv1, bn_Conv1            0 (the stem)
    expanded_conv_depthwise          blocks[0].depthwise        1 (block 0 has no expand layer)
    expanded_conv_project_BN         blocks[0].project_BN       1
    block_<i>_expand                 blocks[i].expand           i + 1 (i = 1..16)
    block_<i>_depthwise_BN           blocks[i].depthwise_BN     i + 1
    Conv_1, Conv_1_bn                Conv_1, Conv_1_bn          18 (the top)
    predictions                      predictions                (only with include_top)
"""

from __future__ import annotations

import re

# MobileNetV2's inverted residual blocks: block_id 0..16 (Keras names block 0 "expanded_conv").
NUM_BLOCKS = 17
# The network as a chain of units, each ending in a named activation: the stem (Conv1, bn_Conv1),
# the 17 blocks, the top (Conv_1, Conv_1_bn). Fine-tuning from a layer cuts before its unit.
NUM_UNITS = NUM_BLOCKS + 2
# A block's weighted layers, in order, as Keras suffixes its names and the NNX block its members.
BLOCK_MEMBERS = ("expand", "expand_BN", "depthwise", "depthwise_BN", "project", "project_BN")
_TOP_LEVEL_LAYERS = ("Conv1", "bn_Conv1", "Conv_1", "Conv_1_bn", "predictions")
_BLOCK_LAYER = re.compile(rf"^(?:expanded_conv_|block_(\d+)_)({'|'.join(BLOCK_MEMBERS)})$")


def block_prefix(block_id: int) -> str:
    """Keras' layer-name prefix of block `block_id`: block 0 is "expanded_conv_", the rest "block_<i>_"."""
    return "expanded_conv_" if block_id == 0 else f"block_{block_id}_"


def backbone_layer_names() -> tuple[str, ...]:
    """MobileNetV2's weighted Keras layers (no top) in network order."""
    names = ["Conv1", "bn_Conv1"]
    for block_id in range(NUM_BLOCKS):
        # Block 0 has no expand layer (its expansion factor is 1).
        members = BLOCK_MEMBERS[2:] if block_id == 0 else BLOCK_MEMBERS
        names += [block_prefix(block_id) + member for member in members]
    return (*names, "Conv_1", "Conv_1_bn")


def keras_layer_path(name: str) -> tuple[str | int, ...] | None:
    """The NNX module path of a weighted Keras MobileNetV2 layer, or None for a name that is not one.

    >>> keras_layer_path("block_3_expand_BN")
    ('blocks', 3, 'expand_BN')
    >>> keras_layer_path("expanded_conv_project")
    ('blocks', 0, 'project')
    """
    if name in _TOP_LEVEL_LAYERS:
        return (name,)
    match = _BLOCK_LAYER.match(name)
    if match is None:
        return None
    block_id = int(match.group(1)) if match.group(1) is not None else 0
    if name.startswith("block_") and block_id == 0:
        return None  # Keras names block 0 "expanded_conv_", never "block_0_"
    return ("blocks", block_id, match.group(2))


def unit_of_layer(name: str) -> int | None:
    """The unit (`NUM_UNITS`) holding a backbone layer: 0 for Conv1, block_id + 1, 18 for Conv_1;
    None for a name that is not a layer of the backbone."""
    path = keras_layer_path(name)
    if path is None or path[0] == "predictions":
        return None
    if path[0] == "blocks":
        return path[1] + 1
    return 0 if path[0] in ("Conv1", "bn_Conv1") else NUM_UNITS - 1
