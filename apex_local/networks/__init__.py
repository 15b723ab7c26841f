"""Q networks: torsos (MLP, Nature CNN), heads (plain, dueling, noisy, C51), LSTM core."""
from apex_local.networks.flat import flat_parameters, load_flat_parameters, num_flat_parameters
from apex_local.networks.heads import NoisyLinear, QHead, QOut
from apex_local.networks.network import QNetwork, State, is_uint8_dtype, make_network
from apex_local.networks.presets import METHODS, preset_overrides
from apex_local.networks.torsos import MLPTorso, NatureCNNTorso, make_torso

__all__ = [
    "METHODS", "MLPTorso", "NatureCNNTorso", "NoisyLinear", "QHead", "QNetwork", "QOut", "State",
    "flat_parameters", "is_uint8_dtype", "load_flat_parameters", "make_network", "make_torso",
    "num_flat_parameters", "preset_overrides",
]
