"""What every pipeline shares: the runtime (devices, strategies, backends), defaults, stages, the stage runner."""
