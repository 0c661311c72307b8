"""Zero-shot image restoration with a ditk prior: degradation operators (`operators`) and methods (one file
each: `ddnm`, `ddrm`, `dps`, `pigdm`, `pnp_flow`) that run as step hooks of the one sampling loop (`ditk.sampling`);
`pipeline` reads inputs, runs a method and writes the output folder of `ditk restore`."""
