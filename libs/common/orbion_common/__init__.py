"""ORBION shared kernel: the contracts and plumbing every service imports."""
