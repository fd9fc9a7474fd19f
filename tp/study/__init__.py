"""tp.study: the study wing: TP emulation on any Hugging Face model (``tp.study.hf``), the
``qformats eval`` job, and the pinned assets it runs on."""
