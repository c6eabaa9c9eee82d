"""xmodal indexer: corpus -> base embeddings -> head -> FAISS snapshot.

Also the code the server shares: encoder, heads, base store, catalog, snapshot I/O.
Submodules are imported where they are needed, so that importing this package stays
cheap (torch and faiss load only with the modules that use them).
"""
