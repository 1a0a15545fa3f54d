"""Feature extraction from raw clips: ``emimimic extract`` and ``emimimic convert-chatglm3``.

Needs the ``extract`` extra (``pip install -e ".[extract]"``). Modules:

- :mod:`~emimimic.extract.media`: PyAV decoding (frames, 16 kHz mono audio), bad-clip reasons;
- :mod:`~emimimic.extract.faces`: face detectors (OpenCV Haar cascade by default) and crops;
- :mod:`~emimimic.extract.visual`, :mod:`~emimimic.extract.audio`, :mod:`~emimimic.extract.asr`,
  :mod:`~emimimic.extract.text`: one stage each (preparer in DataLoader workers, encoder as a
  LightningModule);
- :mod:`~emimimic.extract.engine`: ``Trainer.predict`` over groups of clips, the result writer;
- :mod:`~emimimic.extract.work`: the resumable work folder of per-clip results;
- :mod:`~emimimic.extract.pipeline`: the stages in order, the report and the store (``pack``);
- :mod:`~emimimic.extract.chatglm3`: ChatGLM3 checkpoints -> transformers' GLM classes;
- :mod:`~emimimic.extract.commands`: the command-line entry points.

Nothing here is imported by ``import emimimic``, so training-only installs never need the extra.
"""
