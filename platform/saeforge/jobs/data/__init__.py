"""The data path: text -> token contexts -> activations in the object store.

corpus_stream.py      the training corpus as a Ray Data read task (the driver never holds it)
activation_stream.py  producer actors (the model slice) and the step batches workers read
activation_cache.py   one model pass for a whole search or study, or an activation cache on disk
"""
