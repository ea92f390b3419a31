"""Test session setup: 8 host CPU devices, so sharding tests see a real mesh on any machine.

This must run before any JAX computation, which is why it lives here and not in a test file.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
