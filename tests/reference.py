"""Independent float64 NumPy transcriptions of the paper, for the tests to compare
against. Written from the paper's equations, term by term, sharing no code with
bnjax.

Ioffe & Szegedy 2015: Algorithm 1 (forward), Section 3 (the chain rule for the
backward pass), Algorithm 2 (inference statistics).
"""

import numpy as np


def _valid_values(x, axes, mask):
  """Per feature, the valid values of x as a masked array over ``axes``."""
  x = np.asarray(x)
  if mask is None:
    return np.ma.masked_array(x, mask=np.zeros(x.shape, bool))
  return np.ma.masked_array(x, mask=~np.broadcast_to(np.asarray(mask), x.shape))


def batch_mean_var(x, axes, mask=None):
  """Mini-batch mean and biased variance of Algorithm 1, per feature (keepdims)."""
  xm = _valid_values(
    np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64), axes, mask
  )
  mu = xm.mean(axis=axes, keepdims=True)
  var = (np.abs(xm - mu) ** 2).mean(axis=axes, keepdims=True)
  return np.ma.getdata(mu), np.ma.getdata(var)


def forward(x, gamma, beta, eps, axes, mask=None):
  """Algorithm 1: y = gamma * (x - mu) / sqrt(var + eps) + beta; returns y, mu, var."""
  x = np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64)
  mu, var = batch_mean_var(x, axes, mask)
  x_hat = (x - mu) / np.sqrt(var + eps)
  return gamma * x_hat + beta, mu, var


def backward(x, gamma, dy, eps, axes, mask=None):
  """The paper's Section 3 chain rule, term by term; returns dx, dgamma, dbeta.

  dl/dx_hat = dl/dy * gamma
  dl/dvar   = sum dl/dx_hat * (x - mu) * (-1/2) (var + eps)^(-3/2)
  dl/dmu    = sum dl/dx_hat * (-1 / sqrt(var + eps)) + dl/dvar * sum(-2 (x - mu)) / m
  dl/dx     = dl/dx_hat / sqrt(var + eps) + dl/dvar * 2 (x - mu) / m + dl/dmu / m
  dl/dgamma = sum dl/dy * x_hat,  dl/dbeta = sum dl/dy

  With a mask, mu and var (and m) are over the valid values only, so only valid x
  get the last two terms of dl/dx; the sums over dl/dy run over every output, since
  every y depends on mu and var. A zero dl/dy contributes zero even where x is NaN.
  """
  x = np.asarray(x, np.float64)
  dy = np.asarray(dy, np.float64)
  valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
  xv = np.where(valid, x, 0.0)
  m = valid.sum(axis=axes, keepdims=True)
  mu = xv.sum(axis=axes, keepdims=True) / m
  var = (np.where(valid, (xv - mu) ** 2, 0.0)).sum(axis=axes, keepdims=True) / m
  inv = 1.0 / np.sqrt(var + eps)
  dx_hat = dy * gamma
  with np.errstate(invalid="ignore"):
    centered = np.where(dy != 0, x - mu, 0.0)  # every output's x - mu

  def total(a):
    return a.sum(axis=axes, keepdims=True)

  dvar = total(dx_hat * centered * -0.5 * inv**3)
  dmu = total(dx_hat * -inv) + dvar * total(np.where(valid, -2.0 * (xv - mu), 0.0)) / m
  dx = dx_hat * inv + np.where(valid, dvar * 2.0 * (xv - mu) / m + dmu / m, 0.0)
  dgamma = (dy * centered * inv).sum(axis=axes)
  dbeta = dy.sum(axis=axes)
  return dx, dgamma, dbeta


def population_statistics(batches, axes):
  """Algorithm 2: E[x] = mean of batch means, Var[x] = m/(m-1) * mean of batch variances."""
  means, variances = [], []
  for batch in batches:
    mu, var = batch_mean_var(batch, axes)
    means.append(mu)
    variances.append(var)
  m = np.prod([np.shape(batches[0])[a] for a in axes])
  return np.mean(means, axis=0), m / (m - 1) * np.mean(variances, axis=0)


def ghost_forward(x, gamma, beta, eps, virtual_batch_size, axes):
  """Ghost batch norm as a loop: Algorithm 1 on each group of leading rows."""
  x = np.asarray(x, np.float64)
  outputs, means, variances = [], [], []
  for start in range(0, len(x), virtual_batch_size):
    y, mu, var = forward(x[start : start + virtual_batch_size], gamma, beta, eps, axes)
    outputs.append(y)
    means.append(mu)
    variances.append(var)
  return np.concatenate(outputs), np.mean(means, axis=0), np.mean(variances, axis=0)


def renorm_corrections(x, running_mean, running_var, eps, r_max, d_max, axes):
  """Batch Renormalization's r and d (Ioffe 2017, Algorithm 1), per feature."""
  mu, var = batch_mean_var(x, axes)
  sigma_b, sigma = np.sqrt(var + eps), np.sqrt(running_var + eps)
  r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
  d = np.clip((mu - running_mean) / sigma, -d_max, d_max)
  return r, d


def renorm_forward(x, gamma, beta, eps, r, d, axes):
  """y = ((x - mu_B) / sigma_B * r + d) * gamma + beta, with r and d as given."""
  x = np.asarray(x, np.float64)
  mu, var = batch_mean_var(x, axes)
  return ((x - mu) / np.sqrt(var + eps) * r + d) * gamma + beta
