"""`ditk quantize`: real quantized models through torchao (`real`), simulated DiT post-training quantization
methods (`methods/`, over the shared fake-quant Linear of `layers` and the quantizers of `quantizers`),
calibration sets over the sampling trajectory (`calibration`), and the output folder (`folder`)."""
