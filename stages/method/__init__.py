"""DUDA itself, as functions of tensors and small configs: one self-training step (`step`),
online pseudo labels and the offline merge rule (`pseudo_labels`), the selectors of the initial
labels (`selectors`) and the offline update of a batch of stored labels (`offline`)."""
