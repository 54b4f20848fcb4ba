"""dynammo"""
