"""The suite's LightningDataModules and callbacks (installed as ``patchdd.datamodules``): real data, Stage I's
scoring data and store writer, distilled / synthetic data, the student's validation schedule."""
