"""The data side: the part-file format and file lists, record streams over part files and img2dataset shards,
image decoding and cropping, the synthetic demo data. Imports nothing of the model, the trainer or evaluation."""
