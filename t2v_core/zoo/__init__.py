"""The zoo: task and expert specs and their manifests, image readers over fsspec, and the
embedded demo world. Imports only :mod:`t2v_core.storage`."""
