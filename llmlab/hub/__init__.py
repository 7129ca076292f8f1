"""Model directories in the Hugging Face layout: ``folder`` (``ModelDir``: what ``--model`` names, resolved once),
``mapping`` (our configs and weights ↔ Hugging Face's), ``load`` and ``save`` (the folders), ``gguf`` (GGUF files
converted once). Import from the module you need."""
