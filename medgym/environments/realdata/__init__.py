"""Real data as staged questions: loaders, segmentation folders, VQA datasets, bundled samples.

- :mod:`.loaders` reads NIfTI / DICOM / PNG / TIFF into :class:`~medgym.tools.base.Study`
  objects (MONAI readers, header spacing, PHI stripped, paths kept inside the data folder);
- :mod:`.segdir` turns a segmentation dataset folder into cases through the generic templates;
- :mod:`.vqa` loads VQA-RAD / SLAKE / PathVQA-style question files as cases without traces;
- :mod:`.samples` builds cases with expert traces from real images shipped in installed wheels;
- :mod:`.longitudinal` pairs time points, or makes a labelled synthetic follow-up.
"""
