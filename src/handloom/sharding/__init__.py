"""Building blocks of the sharded strategies (FSDP2 and tensor parallel), one job per module."""
