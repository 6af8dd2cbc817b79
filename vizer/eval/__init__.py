"""How captions are judged: captioning with a loaded model, reference-free and reference metrics, caption
health, the gallery, and `make eval` (base vs tuned on the same pictures, same decoding, same scorers)."""
