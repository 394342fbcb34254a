"""abstract-tagger: tag research-paper abstracts with research-area tags."""

__version__ = "0.1.0"
__all__ = ["Tagger"]


def __getattr__(name: str):
    # Lazy, so `import abstract_tagger.data.corpus` does not pay for torch and transformers.
    if name == "Tagger":
        from abstract_tagger.inference.tagger import Tagger

        return Tagger
    raise AttributeError(name)
