"""Dataset formats: LIBERO HDF5, any HDF5 with a key mapping, LeRobot v2.1 and v3.0, RLDS (TFDS folders; `rlds.is_rlds` detects them)."""
