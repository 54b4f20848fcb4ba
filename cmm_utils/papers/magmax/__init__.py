"""magmax"""
