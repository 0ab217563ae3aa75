"""Drop-in losses for other libraries, on fastcon's engine. Each submodule imports its library lazily:
``fastcon.integrations.sentence_transformers`` (``pip install fastcon[sentence-transformers]``)."""
