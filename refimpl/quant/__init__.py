"""W8A8 checkpoints: the msModelSlim format (`format`) and the quantiser that writes it
(`quantize`). The quantised operators are spec operators in `refimpl.ops.quant`."""

from .format import (DESCRIPTION_NAME, SCHEMES, check_quant_weights, description_of,
                     quant_tensor_specs, quantised_linears, read_description)
from .quantize import calibrate, calibration_sequences, quantize_checkpoint

__all__ = ["DESCRIPTION_NAME", "SCHEMES", "check_quant_weights", "description_of",
           "quant_tensor_specs", "quantised_linears", "read_description", "calibrate",
           "calibration_sequences", "quantize_checkpoint"]
