"""Loss terms, one small module each, composed by :mod:`vaeft.losses.reconstruction`."""
