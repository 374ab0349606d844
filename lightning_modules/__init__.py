"""The suite's LightningModules (installed as ``patchdd.lightning_modules``): the Stage I scorer, the FKD student,
the cross-entropy classifier (teachers) and the diffusion-prior trainer. The math they run is in ``patchdd``."""
