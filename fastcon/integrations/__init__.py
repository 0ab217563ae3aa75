"""Drop-in losses and hooks for other libraries, on fastcon's engine. Each submodule imports its library
lazily: ``sentence_transformers`` (``pip install fastcon[sentence-transformers]``), ``open_clip``
(``apply()``/``revert()``: open_clip's trainer builds fastcon's losses), ``pytorch_metric_learning``
(its NT-Xent and SupCon; the library itself is not needed), ``pylate`` (its Contrastive,
CachedContrastive and Distillation with the MaxSim scores on the token engine)."""
