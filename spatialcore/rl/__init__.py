"""Spatial-RL's generator side (``spatialcore.rl``): the Flux sampler with log-probs
(:mod:`.sampler`), the trained policy (LoRA or full, EMA, export; :mod:`.policy`) and the reward
functions GRPO optimises (:mod:`.reward_fns`: the SpatialScore model's ``mu`` or the dense pixel
oracle). The SpatialScore model itself lives in :mod:`spatialcore.reward`, its trainer in
:mod:`spatialcore.trainers.reward`, the GRPO loop in :mod:`spatialcore.trainers.grpo`."""
