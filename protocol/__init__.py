"""fedpref.protocol"""
