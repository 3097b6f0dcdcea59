"""Weight-only quantized matmul: y = (x @ q) * scale, q int8 or float8_e4m3fn."""
