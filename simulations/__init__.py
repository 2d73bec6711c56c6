"""fedpref.simulations"""
