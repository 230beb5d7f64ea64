"""The machine: device names checked once, peak resident memory per run, and handing freed heap
memory back to the OS."""
