"""The pseudo-label store: a zarr group of labels and confidence levels, one image per chunk
(`pseudo_store`), its chunk files read and written directly (`chunk_files`), the background
writer and read-ahead (`writer`), self-train's working copy and its snapshots
(`working_copy`) and the confidence levels every threshold is applied to (`levels`)."""
