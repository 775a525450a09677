'use strict';
(function () {
  const POLL_MS = 3000;
  const FETCH_TIMEOUT_MS = 8000;
  const LATE_AFTER_MS = 10000;
  const TOKEN_KEY = 'apiToken';
  const HISTORY_WINDOW_SEC = 1800;
  const SVGNS = 'http://www.w3.org/2000/svg';
  const SIDES = { sell: 'A (sell entries)', buy: 'B (buy entries)' };

  const state = {
    token: readToken(),
    timer: null,
    seq: 0,
    lastOkAt: null,      // browser clock, only for the connection indicator
    conn: 'init',        // init | ok | lost | auth | starting
    connDetail: '',
    tokenJustSubmitted: false,
    renderFailures: [],
  };

  // ---------- small helpers ----------
  const $ = (id) => document.getElementById(id);

  function readToken() {
    try { return localStorage.getItem(TOKEN_KEY) || ''; } catch (e) { return ''; }
  }
  function writeToken(value) {
    try {
      if (value) localStorage.setItem(TOKEN_KEY, value); else localStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* storage unavailable: keep it in memory only */ }
  }

  /** An element with a class and children (strings become text nodes, never markup). */
  function el(tag, cls, ...children) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === 'string' ? document.createTextNode(child) : child);
    }
    return node;
  }
  function svgEl(tag, attrs) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }
  function svgTitle(node, text) {
    const t = document.createElementNS(SVGNS, 'title');
    t.textContent = text;
    node.appendChild(t);
    return node;
  }
  function setText(id, text) { $(id).textContent = text; }
  function show(node, visible) { node.hidden = !visible; }

  function num(x) { return typeof x === 'number' && Number.isFinite(x) ? x : null; }
  function str(x) { return x === null || x === undefined ? '' : String(x); }
  function obj(x) { return x !== null && typeof x === 'object' ? x : null; }

  function pad2(n) { return String(n).padStart(2, '0'); }
  function fmtInt(n) {
    const v = num(n);
    if (v === null) return '—';
    const s = String(Math.round(Math.abs(v))).replace(/\B(?=(\d{3})+(?!\d))/g, ',');
    return (v < 0 ? '-' : '') + s;
  }
  function fmtFixed(x, digits) { const v = num(x); return v === null ? '—' : v.toFixed(digits); }
  function fmtSigned(x, digits) {
    const v = num(x);
    if (v === null) return '—';
    return (v > 0 ? '+' : v < 0 ? '−' : '') + Math.abs(v).toFixed(digits);
  }
  function fmtPct(x, digits) { const v = num(x); return v === null ? '—' : v.toFixed(digits) + '%'; }
  function fmtPrice(x) {
    const v = num(x);
    if (v === null) return '—';
    if (v === 0) return '0';
    const a = Math.abs(v);
    return a >= 1000 ? v.toFixed(2) : a >= 1 ? v.toFixed(4) : String(Number(v.toPrecision(6)));
  }
  /** Elapsed time: 45s, 12m 05s, 3h 10m, 2d 04h. */
  function fmtDur(sec) {
    let s = num(sec);
    if (s === null) return '—';
    s = Math.max(0, Math.floor(s));
    if (s < 60) return s + 's';
    if (s < 3600) return Math.floor(s / 60) + 'm ' + pad2(s % 60) + 's';
    if (s < 86400) return Math.floor(s / 3600) + 'h ' + pad2(Math.floor((s % 3600) / 60)) + 'm';
    return Math.floor(s / 86400) + 'd ' + pad2(Math.floor((s % 86400) / 3600)) + 'h';
  }
  /** A rough time to go: ~45m under an hour, ~8h under two days, ~3d beyond. */
  function fmtEta(sec) {
    const s = num(sec);
    if (s === null) return '';
    if (s <= 0) return 'any moment';
    if (s < 3600) return '~' + Math.max(1, Math.min(59, Math.round(s / 60))) + 'm';
    if (s < 2 * 86400) return '~' + Math.max(1, Math.round(s / 3600)) + 'h';
    return '~' + Math.round(s / 86400) + 'd';
  }
  function isoToUnix(iso) {
    if (typeof iso !== 'string') return null;
    const ms = Date.parse(iso);
    return Number.isFinite(ms) ? ms / 1000 : null;
  }
  function fmtClock(ts) {
    const v = num(ts);
    if (v === null) return '—';
    return new Date(v * 1000).toISOString().slice(11, 19);
  }
  function fmtStamp(ts) {
    const v = num(ts);
    if (v === null) return '—';
    return new Date(v * 1000).toISOString().slice(0, 16).replace('T', ' ') + ' UTC';
  }
  function ago(now, ts) {
    const n = num(now), t = num(ts);
    if (n === null || t === null) return '—';
    return fmtDur(n - t) + ' ago';
  }
  function capitalise(s) { s = str(s); return s ? s.charAt(0).toUpperCase() + s.slice(1) : s; }
  function regimeClass(regime) {
    const r = str(regime).toLowerCase();
    return r === 'bearish' || r === 'ranging' || r === 'bullish' ? 'r-' + r : 'r-unknown';
  }
  function regimePill(regime, big) {
    return el('span', 'regime ' + regimeClass(regime) + (big ? ' big' : ''), regime ? String(regime) : '—');
  }

  // ---------- networking ----------
  /** GET ``path``, or POST ``body`` as JSON when one is given; the bearer token goes with either. */
  function apiFetch(path, body) {
    const headers = { Accept: 'application/json' };
    if (state.token) headers.Authorization = 'Bearer ' + state.token;
    const init = { headers, cache: 'no-store', credentials: 'same-origin' };
    if (body !== undefined) {
      init.method = 'POST';
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const ctrl = new AbortController();
    init.signal = ctrl.signal;
    const t = setTimeout(() => ctrl.abort(), FETCH_TIMEOUT_MS);
    return fetch(path, init).finally(() => clearTimeout(t));
  }

  function schedule(ms) {
    clearTimeout(state.timer);
    state.timer = setTimeout(poll, ms);
  }

  async function poll() {
    clearTimeout(state.timer);
    const seq = ++state.seq;
    let next = POLL_MS;
    try {
      const resp = await apiFetch('/api/status');
      if (seq !== state.seq) return;
      if (resp.status === 401) {
        onUnauthorised();
        next = null;  // wait for a token before asking again
      } else if (resp.status === 503) {
        setConn('starting', 'bot starting: no status yet');
        onStarting();
      } else if (!resp.ok) {
        setConn('lost', 'HTTP ' + resp.status);
      } else {
        const data = await resp.json();
        if (seq !== state.seq) return;
        onStatus(data);
      }
    } catch (err) {
      if (seq !== state.seq) return;
      setConn('lost', err && err.name === 'AbortError' ? 'request timed out' : 'no answer');
    } finally {
      if (seq === state.seq && next !== null) schedule(next);
    }
  }

  function setConn(kind, detail) {
    state.conn = kind;
    state.connDetail = detail || '';
    if (kind === 'ok') state.lastOkAt = Date.now();
    renderConn();
  }

  function renderConn() {
    const node = $('connection');
    const since = state.lastOkAt === null ? null : Math.max(0, Math.round((Date.now() - state.lastOkAt) / 1000));
    let kind = state.conn, text;
    if (kind === 'ok' && since !== null && since * 1000 > LATE_AFTER_MS) kind = 'lost';
    if (kind === 'ok') {
      text = 'live · updated ' + since + ' s ago';
    } else if (kind === 'lost') {
      text = 'connection lost — ' + (since === null ? 'no update yet' : 'last update ' + since + ' s ago');
      if (state.connDetail && state.conn === 'lost') text += ' (' + state.connDetail + ')';
    } else if (kind === 'auth') {
      text = 'locked: API token needed';
    } else if (kind === 'starting') {
      text = state.connDetail;
    } else {
      text = 'connecting…';
    }
    node.className = 'conn ' + kind;
    node.textContent = text;
  }

  function onUnauthorised() {
    const rejected = state.token !== '';
    if (rejected) {
      const err = $('token-error');
      err.textContent = state.tokenJustSubmitted
        ? 'That token was not accepted. Check it and try again.'
        : 'The saved token is no longer accepted. Enter the current one.';
      show(err, true);
      state.token = '';
      writeToken('');
    }
    state.tokenJustSubmitted = false;
    setConn('auth');
    show($('main'), false);
    show($('notice'), false);
    show($('token-panel'), true);
    show($('forget-token'), false);
    const input = $('token-input');
    if (document.activeElement !== input) input.focus();
  }

  function onStarting() {
    show($('token-panel'), false);
    if ($('main').hidden) {
      const n = $('notice');
      n.className = 'notice';
      n.textContent = 'The bot is starting: no status has been published yet.';
      show(n, true);
    }
  }

  function onStatus(data) {
    state.tokenJustSubmitted = false;
    show($('token-panel'), false);
    show($('token-error'), false);
    show($('notice'), false);
    show($('main'), true);
    show($('forget-token'), state.token !== '');
    render(data);
    setConn('ok');
  }

  // ---------- rendering ----------
  function section(name, fn) {
    try {
      fn();
    } catch (err) {
      state.renderFailures.push(name);
      console.error('dashboard: could not draw ' + name, err);
    }
  }

  function render(s) {
    state.renderFailures = [];
    const now = num(s.now);
    const hmm = obj(s.hmm) || {};
    section('header', () => renderHeader(s));
    section('tier', () => renderTier(obj(s.regime_tier), now));
    section('policy', () => renderPolicy(obj(hmm.policy), obj(hmm.consensus), obj(s.sim)));
    section('primary model', () => renderModel('primary', obj(hmm.primary), now));
    section('secondary model', () => renderModel('secondary', obj(hmm.secondary), now));
    section('regime history', () => renderHistory(s.regime_history_30m, now));
    section('price chart', () => renderPrice(s.price_history, now));
    section('pipeline', () => renderPipeline(obj(s.hmm_data_pipeline), now));
    section('errors', () => renderErrors(obj(s.health), now));
    section('advisor', () => renderAdvisor(s, now));
    section('grid', () => renderGrid(s, now));
    section('backfill', () => renderBackfill(obj(s.trades_backfill), now));
    section('store', () => renderStore(obj(s.store), now));
    const failed = $('render-error');
    failed.textContent = state.renderFailures.length
      ? 'Could not draw: ' + state.renderFailures.join(', ') + ' (see the browser console).'
      : '';
    show(failed, state.renderFailures.length > 0);
    document.documentElement.setAttribute('data-status-now', str(now));
  }

  function renderHeader(s) {
    setText('pair', str(s.pair) || '—');
    setText('mode', str(s.mode) || '—');
    setText('price', fmtPrice(s.price));
    setText('bot-time', str(s.now_iso) || '—');
    document.title = (s.pair ? s.pair + ' ' : '') + fmtPrice(s.price) + ' · regime grid bot';
    const health = obj(s.health);
    const ok = health ? health.ok === true : null;
    const h = $('health');
    h.className = 'pill ' + (ok === null ? '' : ok ? 'good' : 'bad');
    h.textContent = ok === null ? 'health —' : ok ? 'health ok' : 'health NOT OK';
    const cycles = health ? num(health.cycles) : null;
    const reasons = healthReasons(health);
    h.title = ok === false && reasons.length ? reasons[0] : cycles === null ? '' : fmtInt(cycles) + ' cycles';
    renderHeaderTier(obj(s.regime_tier));
    renderHeaderEquity(obj(s.grid));
  }

  /** The tier the grid trades (effective); under an AI override, also what the mechanical tier is. */
  function renderHeaderTier(rt) {
    const mech = obj(rt && rt.mechanical);
    const eff = obj(rt && rt.effective) || mech;
    const label = (t) => 'tier ' + str(t.tier) + ' · ' + str(t.direction);
    const override = !!eff && eff.source === 'ai_override';
    const shadow = !override && !!mech && mech.shadow === true;
    setText('header-tier', eff ? label(eff) + (shadow ? ' · shadow' : '') : '');
    show($('header-override'), override);
    const mechLine = $('header-mech');
    mechLine.textContent = override && mech ? 'mechanical: ' + label(mech) : '';
    show(mechLine, override && !!mech);
  }

  /** Equity now and net P&L since start (mark-to-market), from the grid's own block. */
  function renderHeaderEquity(g) {
    const balances = obj(g && g.balances) || {}, pnl = obj(g && g.pnl) || {};
    const equity = num(balances.equity_quote);
    show($('header-equity-box'), equity !== null);
    const quote = g ? str(g.quote_asset) : '';
    setText('header-equity', equity === null ? '' : fmtQuote(equity) + (quote ? ' ' + quote : ''));
    const net = num(pnl.net_quote), start = num(pnl.start_equity_quote);
    const pct = start !== null && start > 0 && net !== null ? ' (' + fmtSigned((net / start) * 100, 2) + '%)' : '';
    const pnlNode = $('header-pnl');
    pnlNode.className = signClass(net);
    pnlNode.textContent = net === null ? '' : 'net ' + fmtQuote(net, true) + pct;
  }

  /** Why the bot is not healthy, in plain words (a status without the list has none). */
  function healthReasons(health) {
    const reasons = health && Array.isArray(health.reasons) ? health.reasons : [];
    return reasons.filter((r) => typeof r === 'string' && r !== '');
  }

  function renderTier(rt, now) {
    const mech = obj(rt && rt.mechanical) || {};
    setText('mech-tier', num(mech.tier) === null ? 'Tier —' : 'Tier ' + mech.tier);
    const dir = $('mech-direction');
    dir.textContent = str(mech.direction) || '—';
    dir.className = 'direction d-' + str(mech.direction);
    setText('mech-since', num(mech.since) === null || now === null ? '—' : fmtDur(now - mech.since));

    const shadow = $('mech-shadow');
    const wb = obj(mech.would_be);
    if (mech.shadow === true) {
      shadow.textContent = 'shadow mode — would be: tier ' + (wb ? str(wb.tier) : '—') + ' ' + (wb ? str(wb.direction) : '');
      shadow.title = 'REGIME_DIRECTIONAL_ENABLED is off: the tier is pinned to 0 and only computed for display.';
    }
    show(shadow, mech.shadow === true);

    const held = $('mech-held');
    held.textContent = mech.held_because ? 'held: ' + str(mech.held_because) : '';
    show(held, Boolean(mech.held_because));

    const eff = obj(rt && rt.effective);
    setText('effective-tier', eff
      ? 'tier ' + str(eff.tier) + ' · ' + str(eff.direction) + ' (' + str(eff.source) + ')'
      : '—');
    const side = rt ? rt.suppressed_side : null;
    setText('suppressed-side', side ? (SIDES[side] || String(side)) : 'none');
    const band = rt ? str(rt.capacity_band) : '';
    const bandNode = $('capacity-band');
    bandNode.textContent = band || '—';
    bandNode.className = band === 'normal' ? 'band-normal' : band === 'stop' ? 'band-stop' : band ? 'band-other' : '';

    const size = rt ? num(rt.entry_size) : null;
    setText('entry-size', size === null ? '—'
      : Math.round(size * 100) + ' %' + (size < 1 ? ' (larger moves likely: the grid trades smaller)' : ''));
    setText('direction-skill', skillText(obj(rt && rt.direction_skill)));

    const list = $('transitions');
    list.replaceChildren();
    const items = Array.isArray(rt && rt.recent_transitions) ? rt.recent_transitions.slice() : [];
    items.sort((a, b) => (num(b && b.ts) || 0) - (num(a && a.ts) || 0));
    for (const t of items.slice(0, 8)) {
      if (!obj(t)) continue;
      const when = el('span', 'when num', fmtClock(t.ts));
      when.title = ago(now, t.ts);
      const move = 'tier ' + str(t.from_tier) + ' → ' + str(t.to_tier);
      const dirs = t.from_direction === t.to_direction
        ? str(t.to_direction)
        : str(t.from_direction) + ' → ' + str(t.to_direction);
      const li = el('li', '', el('div', '', when, el('span', 'what', move), el('span', 'dirs', dirs)),
        el('div', 'why', str(t.reason)));
      if (t.shadow) li.appendChild(el('span', 'pill warn', 'shadow'));
      list.appendChild(li);
    }
    if (!list.firstChild) list.appendChild(el('li', 'empty', 'No tier changes yet.'));
  }

  function skillText(sk) {
    if (!sk) return '—';
    if (sk.gate === false) return 'gate off: tiers act on confidence alone';
    const pct = (x) => (num(x) === null ? '—' : (x * 100).toFixed(1) + ' %');
    const scored = num(sk.scored) || 0;
    if (!scored) return 'no direction call scored yet: directional tiers wait';
    return 'right ' + pct(sk.hit_rate) + ' of ' + fmtInt(scored) + ' calls (at least ' + pct(sk.lower_bound)
      + '): earned ' + Math.round((num(sk.earned) || 0) * 100) + ' %';
  }

  function renderPolicy(policy, consensus, sim) {
    const list = $('policy-line');
    list.replaceChildren();
    if (!policy) {
      setText('policy-source', '');
      list.appendChild(el('dd', 'empty', 'No policy signal yet.'));
      return;
    }
    const agreement = str(policy.agreement || (consensus && consensus.agreement));
    setText('policy-source', '· ' + (str(policy.source) || '—') + (agreement ? ' · agreement ' + agreement : ''));
    const row = (label, ...content) => list.append(el('dt', '', label), el('dd', '', ...content));
    row('Regime', regimePill(policy.regime));
    row('Confidence',
      el('span', 'num', fmtFixed(policy.raw_confidence, 3)), el('span', 'faint', ' raw'),
      el('span', 'arrow', '→'), el('span', 'num', '× ' + fmtFixed(policy.confidence_modifier, 2)),
      el('span', 'arrow', '→'), el('b', 'num', fmtFixed(policy.effective_confidence, 3)),
      el('span', 'faint', ' effective'));
    row('Bias', el('span', 'num', fmtSigned(policy.bias_signal, 3)));
    if (sim && sim.true_regime) row('Simulator truth', regimePill(sim.true_regime));
  }

  const modelCards = {};

  function buildModelCard(key, title) {
    const card = $('hmm-' + key);
    const t = (name, tag, cls) => {
      const node = el(tag || 'span', cls || '');
      node.setAttribute('data-testid', name + '-' + key);
      return node;
    };
    const parts = {
      interval: el('span', 'sub'),
      trained: t('trained', 'span', 'pill'),
      regime: t('regime', 'span', 'regime big'),
      note: el('span', 'model-note'),
      confRaw: t('conf-raw', 'span', 'num'),
      confEff: t('conf-eff', 'b', 'num'),
      modifier: el('span', 'faint num'),
      bias: t('bias', 'dd', 'num'),
      probsBar: el('div', 'probs'),
      probsText: t('probs', 'div', 'muted num'),
      lastTrained: t('last-trained', 'dd', 'num'),
      label: t('depth-label', 'span', 'depth-label num'),
      eta: t('depth-eta', 'span', 'eta'),
      bar: t('depth-bar', 'div', 'bar tier-none'),
      fill: el('div', 'fill'),
      error: el('div', 'err-text'),
      body: el('div', ''),
      disabled: el('div', 'empty', 'Model not enabled.'),
    };
    parts.bar.appendChild(parts.fill);
    const probsDd = el('dd', '', parts.probsBar, parts.probsText);
    const confDd = el('dd', '', parts.confRaw, el('span', 'faint', ' raw · '), parts.confEff,
      el('span', 'faint', ' effective '), parts.modifier);
    parts.body.append(
      el('div', 'model-top', parts.regime, parts.note),
      el('dl', 'kv',
        el('dt', '', 'Confidence'), confDd,
        el('dt', '', 'Bias'), parts.bias,
        el('dt', '', 'Probabilities'), probsDd,
        el('dt', '', 'Last trained'), parts.lastTrained),
      el('div', 'depth',
        el('div', 'depth-head', parts.label, parts.eta),
        parts.bar),
      parts.error);
    card.replaceChildren(el('h2', '', title + ' model', parts.interval, el('span', 'right', parts.trained)),
      parts.body, parts.disabled);
    modelCards[key] = parts;
  }

  function depthLabel(d) {
    const tier = d ? d.quality_tier : null;
    const cur = fmtInt(d && d.current_candles), target = fmtInt(d && d.target_candles);
    if (tier === 'full') return cur + '/' + target + ' — Full';
    const pct = num(d && d.pct_complete);
    const pctText = pct === null ? '' : ' (' + Math.round(pct) + '%)';
    return cur + '/' + target + pctText + ' — ' + (tier ? capitalise(tier) : 'Untrained');
  }

  function renderModel(key, m, now) {
    const p = modelCards[key];
    show(p.body, Boolean(m));
    show(p.disabled, !m);
    show(p.trained, Boolean(m));
    if (!m) {
      p.interval.textContent = '';
      return;
    }
    p.interval.textContent = num(m.interval_min) === null ? '' : m.interval_min + 'm candles';
    p.trained.textContent = m.trained ? 'trained' : 'not trained';
    p.trained.className = 'pill ' + (m.trained ? 'good' : '');
    p.regime.textContent = str(m.regime) || '—';
    p.regime.className = 'regime big ' + regimeClass(m.regime);
    p.note.textContent = m.trained ? '' : 'no model yet: this signal carries no weight';

    const d = obj(m.training_depth);
    const modifier = d ? num(d.confidence_modifier) : null;
    const raw = num(m.confidence);
    p.confRaw.textContent = fmtFixed(raw, 3);
    p.confEff.textContent = raw === null || modifier === null ? '—' : (raw * modifier).toFixed(3);
    p.modifier.textContent = modifier === null ? '' : '(× ' + modifier.toFixed(2) + ')';
    p.bias.textContent = fmtSigned(m.bias_signal, 3);

    const probs = obj(m.probabilities);
    p.probsBar.replaceChildren();
    if (probs) {
      for (const k of ['bearish', 'ranging', 'bullish']) {
        const v = Math.max(0, num(probs[k]) || 0);
        const seg = el('span', 'p-' + k);
        seg.style.width = (v * 100).toFixed(2) + '%';
        seg.title = k + ' ' + (v * 100).toFixed(1) + '%';
        p.probsBar.appendChild(seg);
      }
      p.probsText.textContent = 'bear ' + fmtPct(num(probs.bearish) === null ? null : probs.bearish * 100, 1) +
        ' · range ' + fmtPct(num(probs.ranging) === null ? null : probs.ranging * 100, 1) +
        ' · bull ' + fmtPct(num(probs.bullish) === null ? null : probs.bullish * 100, 1);
    } else {
      p.probsText.textContent = '—';
    }
    show(p.probsBar, Boolean(probs));
    p.lastTrained.textContent = num(m.last_trained_at) === null
      ? 'never'
      : fmtStamp(m.last_trained_at) + ' · ' + ago(now, m.last_trained_at);

    const tier = d ? d.quality_tier : null;
    p.label.textContent = depthLabel(d);
    p.label.className = 'depth-label num' + (tier ? '' : ' untrained');
    p.label.title = d
      ? 'confidence modifier ' + fmtFixed(d.confidence_modifier, 2) + ' · ' + fmtInt(d.available_candles) + ' candles stored'
      : '';
    p.bar.className = 'bar tier-' + (tier ? String(tier).replace(/[^a-z]/g, '') : 'none');
    const pct = d ? num(d.pct_complete) : null;
    p.fill.style.width = Math.max(0, Math.min(100, pct || 0)) + '%';
    const etaAt = d ? isoToUnix(d.estimated_full_at) : null;
    const eta = tier === 'full' || etaAt === null || now === null ? '' : 'est. full: ' + fmtEta(etaAt - now);
    p.eta.textContent = eta;
    if (d && d.estimated_full_at) p.eta.title = String(d.estimated_full_at);
    show(p.eta, eta !== '');

    p.error.textContent = m.last_error ? 'last error: ' + str(m.last_error) : '';
    show(p.error, Boolean(m.last_error));
  }

  function renderHistory(history, now) {
    const box = $('history-chart');
    const W = 600, H = 64;
    const root = svgEl('svg', { viewBox: '0 0 ' + W + ' ' + H, preserveAspectRatio: 'none', height: H,
      role: 'img', 'aria-label': 'regime history, last 30 minutes' });
    root.appendChild(svgEl('line', { class: 'guide', x1: 0, x2: W, y1: H / 2, y2: H / 2, 'vector-effect': 'non-scaling-stroke' }));
    root.appendChild(svgEl('line', { class: 'frame', x1: 0, x2: W, y1: H - 0.5, y2: H - 0.5, 'vector-effect': 'non-scaling-stroke' }));
    const entries = (Array.isArray(history) ? history : [])
      .filter((e) => obj(e) && num(e.ts) !== null)
      .sort((a, b) => a.ts - b.ts);
    if (now !== null) {
      const start = now - HISTORY_WINDOW_SEC;
      const x = (ts) => Math.max(0, Math.min(W, ((ts - start) / HISTORY_WINDOW_SEC) * W));
      entries.forEach((e, i) => {
        const end = i + 1 < entries.length ? entries[i + 1].ts : now;
        if (end < start && i + 1 < entries.length) return;  // wholly outside the window
        const x0 = x(e.ts);
        const x1 = Math.max(x(end), x0 + 1.5);
        const conf = Math.max(0, Math.min(1, num(e.conf) || 0));
        const h = Math.max(2, conf * (H - 1));
        const rect = svgEl('rect', {
          class: 'hist-entry ' + regimeClass(e.regime),
          x: x0.toFixed(2), width: Math.max(1, x1 - x0 - 0.6).toFixed(2),
          y: (H - 1 - h).toFixed(2), height: h.toFixed(2),
          'data-conf': conf.toFixed(4),
        });
        svgTitle(rect, fmtClock(e.ts) + ' · ' + str(e.regime) + ' · conf ' + conf.toFixed(3));
        root.appendChild(rect);
      });
    }
    box.replaceChildren(root);
    if (!entries.length) box.appendChild(el('div', 'empty', 'No regime evaluations in the last 30 minutes.'));
  }

  function renderPrice(history, now) {
    const box = $('price-chart');
    const W = 600, H = 170;
    const pts = (Array.isArray(history) ? history : [])
      .filter((p) => obj(p) && num(p.ts) !== null && num(p.close) !== null)
      .sort((a, b) => a.ts - b.ts);
    const root = svgEl('svg', { viewBox: '0 0 ' + W + ' ' + H, preserveAspectRatio: 'none', height: H,
      role: 'img', 'aria-label': 'price with regime shading' });
    box.replaceChildren(root);
    setText('price-start', '');
    setText('price-end', '');
    setText('price-sub', '');
    if (pts.length === 0) {
      box.appendChild(el('div', 'empty', 'No price history yet.'));
      return;
    }
    const t0 = pts[0].ts;
    const t1 = pts.length > 1 ? pts[pts.length - 1].ts : t0 + 60;
    const step = pts.length > 1 ? (t1 - t0) / (pts.length - 1) : 60;
    let lo = Infinity, hi = -Infinity;
    for (const p of pts) { lo = Math.min(lo, p.close); hi = Math.max(hi, p.close); }
    const pad = (hi - lo) * 0.16 || Math.abs(hi) * 0.001 || 1;
    const yLo = lo - pad, yHi = hi + pad;
    const x = (ts) => ((ts - t0) / Math.max(t1 - t0, 1e-9)) * W;
    const y = (v) => H - ((v - yLo) / (yHi - yLo)) * H;

    // regime bands: one rect per run of equal regime
    let runStart = 0;
    for (let i = 1; i <= pts.length; i++) {
      if (i < pts.length && pts[i].regime === pts[runStart].regime) continue;
      const a = Math.max(0, x(pts[runStart].ts - step / 2));
      const b = Math.min(W, x(pts[i - 1].ts + step / 2));
      if (pts[runStart].regime) {
        const band = svgEl('rect', { class: 'regime-band ' + regimeClass(pts[runStart].regime),
          x: a.toFixed(2), y: 0, width: Math.max(0.5, b - a).toFixed(2), height: H });
        svgTitle(band, str(pts[runStart].regime) + ' ' + fmtClock(pts[runStart].ts) + '–' + fmtClock(pts[i - 1].ts));
        root.appendChild(band);
      }
      runStart = i;
    }
    root.appendChild(svgEl('line', { class: 'guide', x1: 0, x2: W, y1: y(hi), y2: y(hi), 'vector-effect': 'non-scaling-stroke' }));
    root.appendChild(svgEl('line', { class: 'guide', x1: 0, x2: W, y1: y(lo), y2: y(lo), 'vector-effect': 'non-scaling-stroke' }));
    const line = svgEl('polyline', {
      class: 'price-line',
      'vector-effect': 'non-scaling-stroke',
      points: pts.map((p) => x(p.ts).toFixed(2) + ',' + y(p.close).toFixed(2)).join(' '),
    });
    root.appendChild(line);
    box.appendChild(el('span', 'y-label top num', fmtPrice(hi)));
    box.appendChild(el('span', 'y-label bottom num', fmtPrice(lo)));
    const spanText = fmtDur(t1 - t0);
    setText('price-sub', pts.length + ' candles · ' + spanText);
    setText('price-start', now === null ? fmtClock(t0) : fmtClock(t0) + ' (' + fmtDur(now - t0) + ' ago)');
    setText('price-end', fmtClock(t1) + ' · last ' + fmtPrice(pts[pts.length - 1].close));
  }

  function renderPipeline(pipe, now) {
    const box = $('pipeline');
    box.replaceChildren();
    const keys = pipe ? Object.keys(pipe) : [];
    keys.sort((a, b) => (num(obj(pipe[a]) && pipe[a].interval_min) || 0) - (num(obj(pipe[b]) && pipe[b].interval_min) || 0));
    for (const key of keys) {
      const f = obj(pipe[key]);
      if (!f) continue;
      const status = str(f.status) || 'unknown';
      const pill = el('span', 'pill st-' + status.replace(/[^a-z]/g, ''), status);
      pill.setAttribute('data-testid', 'pipeline-status-' + key);
      const cover = el('div', 'bar thin', el('div', 'fill'));
      cover.firstChild.style.width = Math.max(0, Math.min(100, num(f.coverage_pct) || 0)) + '%';
      const fresh = num(f.freshness_sec), limit = num(f.freshness_limit_sec);
      const freshDd = el('dd', 'num', el('span', fresh !== null && limit !== null && fresh > limit ? 'over' : '', fmtDur(fresh)),
        el('span', 'faint', ' (limit ' + fmtDur(limit) + ')'));
      const err = f.last_error
        ? el('dd', 'err-text', str(f.last_error) + (num(f.last_error_at) !== null ? ' · ' + ago(now, f.last_error_at) : ''))
        : el('dd', 'faint', 'none');
      const feed = el('div', 'feed',
        el('div', 'feed-head', el('b', '', key + ' candles'), pill),
        cover,
        el('dl', 'kv',
          el('dt', '', 'Rows'), el('dd', 'num', fmtInt(f.rows_available) + ' / ' + fmtInt(f.target_rows) +
            ' · ' + fmtPct(f.coverage_pct, 1)),
          el('dt', '', 'Freshness'), freshDd,
          el('dt', '', 'Last sync'), el('dd', 'num', ago(now, f.last_sync_at)),
          el('dt', '', 'Last error'), err));
      feed.setAttribute('data-testid', 'pipeline-' + key);
      box.appendChild(feed);
    }
    if (!box.firstChild) box.appendChild(el('div', 'empty', 'No pipeline data.'));
  }

  function renderErrors(health, now) {
    const list = $('errors');
    list.replaceChildren();
    // Why health is not ok comes first; "No errors." is never shown while it is not.
    const notOk = !!health && health.ok === false;
    const reasons = notOk ? healthReasons(health) : [];
    for (const reason of reasons) {
      list.appendChild(tid(el('li', 'reason', el('span', 'pill bad src', 'not ok'), el('span', 'msg', reason)), 'health-reason'));
    }
    const errors = (health && Array.isArray(health.errors) ? health.errors : []).filter(obj).slice();
    errors.sort((a, b) => (num(b.ts) || 0) - (num(a.ts) || 0));
    for (const e of errors) {
      const when = el('span', 'when num', fmtClock(e.ts));
      when.title = ago(now, e.ts);
      const repeats = num(e.count) > 1 ? tid(el('span', 'faint', ' ×' + e.count), 'error-count') : null;
      list.appendChild(el('li', '', when, el('span', 'pill src', str(e.source) || '?'), el('span', 'msg', str(e.message), repeats)));
    }
    if (!list.firstChild && notOk) {
      list.appendChild(el('li', 'reason', el('span', 'pill bad src', 'not ok'), el('span', 'msg', 'health is not ok (no reason given)')));
    }
    if (!list.firstChild) list.appendChild(el('li', 'empty', 'No errors.'));
  }

  // ---------- grid engine (SPEC section 8) and trades backfill ----------
  // The status promises these lengths; a longer list is cut, never drawn in full.
  const GRID_ROWS = { orders: 40, fills: 20, cycles: 10, notes: 10 };
  const CAPACITY_BANDS = ['normal', 'caution', 'stop'];
  const KELLY_REGIMES = ['RANGING', 'BULLISH', 'BEARISH'];
  const NOTE_KINDS = { unfunded: 'unfunded', exposure_cap: 'exposure cap', capacity: 'capacity',
    rejected: 'rejected', reconciled: 'reconciled' };
  const MAX_PRICE_DECIMALS = 8;

  function tid(node, id) { node.setAttribute('data-testid', id); return node; }
  function rows(x, limit) { return (Array.isArray(x) ? x : []).filter(obj).slice(0, limit); }
  function newestFirst(items, key) {
    return items.slice().sort((a, b) => (num(b[key]) || 0) - (num(a[key]) || 0));
  }
  /** ``x`` with ``digits`` decimals and thousands separators; ``signed`` adds + to gains. */
  function fmtAmount(x, digits, signed) {
    const v = num(x);
    if (v === null) return '—';
    const fixed = Math.abs(v).toFixed(digits);
    const [whole, frac] = fixed.split('.');
    const body = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ',') + (frac === undefined ? '' : '.' + frac);
    if (Number(fixed) === 0) return body;
    return (v < 0 ? '−' : signed ? '+' : '') + body;
  }
  /** A quote-currency amount: 2 decimals (4 for a per-order amount under a cent, so it does not read 0.00). */
  function fmtQuote(x, signed, fine) {
    const v = num(x);
    return fmtAmount(v, fine && v !== null && v !== 0 && Math.abs(v) < 0.01 ? 4 : 2, signed);
  }
  /** A base-asset amount: up to 4 decimals (8 under one unit), trailing zeros dropped. */
  function fmtBase(x) {
    const v = num(x);
    if (v === null) return '—';
    return fmtAmount(v, Math.abs(v) >= 1 ? 4 : 8, false).replace(/(\.\d*?)0+$/, '$1').replace(/\.$/, '');
  }
  function signClass(x) { const v = num(x); return v === null || v === 0 ? 'num' : v > 0 ? 'num pos' : 'num neg'; }
  function decimalsOf(v) {
    for (let d = 0; d <= MAX_PRICE_DECIMALS; d++) {
      if (Math.abs(Number(v.toFixed(d)) - v) <= Math.abs(v) * 1e-12) return d;
    }
    return null;
  }
  /**
   * Decimals of the pair's prices: ``grid.price_decimals`` when the status gives it, else learnt
   * from the order, fill and cycle prices (the engine places them on the pair's tick). null when
   * a price is not on any tick: then prices fall back to the page's usual six significant digits.
   */
  function gridPriceDecimals(g) {
    const given = num(g.price_decimals);
    if (given !== null && given >= 0 && given <= 12) return Math.round(given);
    const prices = [];
    for (const o of rows(g.open_orders, GRID_ROWS.orders)) prices.push(o.price);
    for (const f of rows(g.recent_fills, GRID_ROWS.fills)) prices.push(f.price);
    for (const c of rows(g.recent_cycles, GRID_ROWS.cycles)) prices.push(c.entry_price, c.exit_price);
    let best = null;
    for (const p of prices) {
      const v = num(p);
      if (v === null || v === 0) continue;
      const d = decimalsOf(v);
      if (d === null) return null;
      best = Math.max(best === null ? 0 : best, d);
    }
    return best;
  }
  function kvRows(list) {
    const out = [];
    for (const [label, ...content] of list) out.push(el('dt', '', label), el('dd', '', ...content));
    return out;
  }
  function meter(pct, cls) {
    const bar = el('div', 'bar thin gc-meter ' + (cls || ''), el('div', 'fill'));
    bar.firstChild.style.width = Math.max(0, Math.min(100, num(pct) || 0)) + '%';
    return bar;
  }
  function sideSpan(side) { return el('span', 'side-' + slug(side), str(side) || '—'); }
  function slotLeg(slot, leg) { return '#' + (num(slot) === null ? '?' : String(slot)) + ' ' + str(leg); }
  function table(headers, bodyRows, rightCols) {
    const head = el('tr', '');
    headers.forEach((h, i) => head.appendChild(el('th', rightCols.includes(i) ? 'r' : '', h)));
    return el('table', 'hist', el('thead', '', head), el('tbody', '', ...bodyRows));
  }
  function cells(row, values, rightCols, nowrapCols) {
    values.forEach((v, i) => {
      const cls = [rightCols.includes(i) ? 'r' : '', (nowrapCols || [0, 1]).includes(i) ? 'nw' : ''];
      row.appendChild(el('td', cls.join(' ').trim(), v));
    });
    return row;
  }

  function renderGrid(s, now) {
    const g = obj(s.grid);
    const card = $('grid-card');
    card.classList.toggle('grid-off', !g);
    show($('grid-off'), !g);
    show($('grid-on'), Boolean(g));
    show($('grid-badge-box'), Boolean(g));
    if (!g) {
      card.setAttribute('data-band', '');
      put($('grid-sub'), 'engine off');
      return;
    }
    const digits = gridPriceDecimals(g);
    const price = (x) => (digits === null ? fmtPrice(x) : fmtAmount(x, digits, false));
    const quote = str(g.quote_asset), base = str(g.base_asset);
    put($('grid-sub'), [str(g.exchange), str(g.pair), base && quote ? base + '/' + quote : ''].filter(Boolean).join(' · '));

    const cap = obj(g.capacity) || {};
    const band = str(cap.band);
    const badge = $('grid-capacity-band');
    const known = CAPACITY_BANDS.includes(band);
    put(badge, 'capacity ' + (band || '—'));
    badge.className = 'cap-badge' + (known ? ' cap-' + band : '');
    card.setAttribute('data-band', known ? band : '');
    const alert = $('grid-alert');
    put(alert, band === 'stop'
      ? 'Capacity STOP: ' + fmtInt(cap.open_orders) + ' of ' + fmtInt(cap.max_open_orders) +
        ' open orders, headroom ' + fmtInt(cap.headroom) + '. Tier upgrades are refused until orders clear.'
      : '');
    show(alert, band === 'stop');

    redraw($('grid-posture'), JSON.stringify([g.posture, now]), () => postureNodes(obj(g.posture), now));
    redraw($('grid-balances'), JSON.stringify([g.balances, digits, quote, base]),
      () => balanceNodes(obj(g.balances), price, quote, base));
    const pnl = obj(g.pnl) || {};
    put($('grid-pnl-start'), num(pnl.start_equity_quote) === null ? ''
      : 'since start at ' + fmtQuote(pnl.start_equity_quote) + (quote ? ' ' + quote : ''));
    redraw($('grid-pnl'), JSON.stringify([pnl, quote]), () => pnlNodes(pnl, quote));
    redraw($('grid-limits'), JSON.stringify([cap, g.exposure, quote]), () => limitNodes(cap, obj(g.exposure), quote));
    redraw($('grid-signals'), JSON.stringify([g.signals, now, digits]), () => signalNodes(obj(g.signals), now, price));
    const slots = rows(g.slots, 1000);
    redraw($('grid-slots'), JSON.stringify(slots), () => slotNodes(slots));

    const orders = newestFirst(rows(g.open_orders, GRID_ROWS.orders), 'placed_at');
    put($('grid-orders-count'), orders.length ? orders.length + ' · newest first' : '');
    redraw($('grid-orders'), JSON.stringify([orders, now, digits]), () => orderNodes(orders, now, price));
    const fills = newestFirst(rows(g.recent_fills, GRID_ROWS.fills), 'ts');
    redraw($('grid-fills'), JSON.stringify([fills, digits]), () => fillNodes(fills, price));
    const cycles = newestFirst(rows(g.recent_cycles, GRID_ROWS.cycles), 'closed_at');
    redraw($('grid-cycles'), JSON.stringify([cycles, digits]), () => cycleNodes(cycles, price));
    const notes = newestFirst(rows(g.notes, GRID_ROWS.notes), 'ts');
    redraw($('grid-notes'), JSON.stringify([notes, now]), () => noteNodes(notes, now));
  }

  function postureNodes(p, now) {
    if (!p) return [el('span', 'empty', 'No posture yet.')];
    const source = str(p.source);
    const sourcePill = tid(el('span', 'pill' + (source === 'ai_override' ? ' override' : ''),
      source === 'ai_override' ? 'AI override' : source || 'source —'), 'grid-posture-source');
    const side = str(p.suppressed_side);
    const strength = num(p.strength);
    const since = num(p.since) !== null && now !== null ? 'for ' + fmtDur(now - p.since) : '';
    return [
      tid(el('span', 'gc-tier', tierLabel(p.tier)), 'grid-posture-tier'),
      tid(el('span', dirClass(p.direction), str(p.direction) || '—'), 'grid-posture-direction'),
      sourcePill,
      strength === null ? null : el('span', 'muted num', 'strength ' + strength.toFixed(2)),
      since ? el('span', 'muted num', since) : null,
      tid(side ? el('span', 'pill warn', side + ' entries suppressed') : el('span', 'faint', 'no side suppressed'),
        'grid-suppressed'),
    ];
  }

  function balanceNodes(b, price, quote, base) {
    if (!b) return [el('dd', 'empty', 'No balances yet.')];
    const unit = (u) => (u ? ' ' + u : '');
    const detail = (free, reserved, fmt) => el('span', 'faint num', ' · free ' + fmt(free) + ' · reserved ' + fmt(reserved));
    return kvRows([
      [quote || 'Quote', tid(el('span', 'num', fmtQuote(b.quote)), 'grid-quote'), detail(b.quote_free, b.quote_reserved, (x) => fmtQuote(x))],
      [base || 'Base', tid(el('span', 'num', fmtBase(b.base)), 'grid-base'), detail(b.base_free, b.base_reserved, fmtBase)],
      ['Price', tid(el('span', 'num', price(b.price)), 'grid-price')],
      ['Equity', tid(el('b', 'num big-num', fmtQuote(b.equity_quote) + unit(quote)), 'grid-equity')],
    ]);
  }

  function pnlNodes(p, quote) {
    const unit = quote ? ' ' + quote : '';
    const start = num(p.start_equity_quote), net = num(p.net_quote);
    const pct = start !== null && start > 0 && net !== null ? ' (' + fmtSigned((net / start) * 100, 2) + '%)' : '';
    return kvRows([
      ['Net', tid(el('b', signClass(net) + ' big-num', fmtQuote(net, true) + unit + pct), 'grid-pnl-net')],
      ['Realized', tid(el('span', signClass(p.realized_quote), fmtQuote(p.realized_quote, true) + unit), 'grid-pnl-realized')],
      ['Fees paid', tid(el('span', 'num', fmtQuote(p.fees_quote) + unit), 'grid-fees')],
      ['Cycles', tid(el('span', 'num', fmtInt(p.cycles)), 'grid-cycles-count')],
      ['Max drawdown', tid(el('span', 'num' + (num(p.max_drawdown_pct) > 0 ? ' neg' : ''), fmtPct(p.max_drawdown_pct, 2)),
        'grid-drawdown')],
    ]);
  }

  function limitNodes(cap, exp, quote) {
    const open = num(cap.open_orders), max = num(cap.max_open_orders);
    const band = str(cap.band);
    const capText = fmtInt(open) + ' / ' + fmtInt(max) + ' open · headroom ' + fmtInt(cap.headroom);
    const used = open !== null && max ? (open / max) * 100 : null;
    const out = [['Open orders', tid(el('span', 'num', capText), 'grid-capacity'),
      meter(used, CAPACITY_BANDS.includes(band) ? 'm-' + band : '')]];
    if (!exp) {
      out.push(['Exposure', tid(el('span', 'faint', '—'), 'grid-exposure')]);
    } else {
      const q = num(exp.quote), capQ = num(exp.cap_quote);
      const share = q !== null && capQ ? (q / capQ) * 100 : null;
      const text = fmtQuote(q) + (capQ === null ? ' (no cap)' : ' / ' + fmtQuote(capQ)) + (quote ? ' ' + quote : '') +
        (share === null ? '' : ' (' + Math.round(share) + '%)');
      out.push(['Exposure', tid(el('span', 'num' + (share !== null && share >= 100 ? ' neg' : ''), text), 'grid-exposure'),
        share === null ? null : meter(share, share >= 100 ? 'm-stop' : share >= 80 ? 'm-caution' : '')]);
    }
    return kvRows(out);
  }

  function signalNodes(sig, now, price) {
    if (!sig) return [el('dd', 'empty', 'No signals yet.')];
    const recovery = num(sig.recovery_orders);
    const trend = obj(sig.trend);
    let trendNode;
    if (!trend) {
      trendNode = el('span', 'faint', '—');
    } else {
      const stateName = str(trend.state) || '—';
      const cls = { bullish: 'r-bullish', bearish: 'r-bearish', neutral: 'r-ranging' }[stateName] || 'r-unknown';
      const since = num(trend.since) === null
        ? el('span', 'faint', ' warming up')
        : el('span', 'muted num', ' since ' + fmtClock(trend.since) + (now === null ? '' : ' (' + ago(now, trend.since) + ')'));
      const emas = num(trend.ema_fast) === null && num(trend.ema_slow) === null ? null
        : el('div', 'faint num', 'EMA fast ' + price(trend.ema_fast) + ' · slow ' + price(trend.ema_slow));
      trendNode = el('span', '', el('span', 'regime ' + cls, stateName), since, emas);
    }
    return kvRows([
      ['Fills (1h)', tid(el('span', 'num', fmtInt(sig.fills_last_hour)), 'grid-fills-hour')],
      ['Recovery orders', tid(el('span', 'num' + (recovery > 0 ? ' over' : ''), fmtInt(recovery)), 'grid-recovery')],
      ['Trend', tid(trendNode, 'grid-trend')],
    ]).concat([el('dt', 'wide', 'Kelly edge by regime'),
      el('dd', 'wide', kellyTable(obj(sig.kelly), num(sig.kelly_min_samples)))]);
  }

  function kellyTable(kelly, minSamples) {
    const k = kelly || {};
    const keys = KELLY_REGIMES.concat(Object.keys(k).filter((r) => !KELLY_REGIMES.includes(r)));
    const body = el('tbody');
    for (const regime of keys) {
      const e = obj(k[regime]);
      let cell;
      if (!e) {
        cell = el('td', 'faint', '— · needs ' + (minSamples === null ? 'more' : fmtInt(minSamples)) + ' samples');
      } else {
        const f = num(e.kelly_fraction);
        cell = el('td', '', el('b', signClass(f), fmtFixed(f, 2)),
          el('span', 'faint', ' · ' + fmtInt(e.samples) + ' samples · win ' +
            (num(e.win_rate) === null ? '—' : Math.round(e.win_rate * 100) + '%') +
            ' · avg +' + fmtFixed(e.avg_win_pct, 2) + '% / −' + fmtFixed(e.avg_loss_pct, 2) + '%'));
      }
      body.appendChild(tid(el('tr', '', el('th', '', regime), cell), 'grid-kelly-' + regime.replace(/[^A-Za-z_]/g, '')));
    }
    return tid(el('table', 'kelly', body), 'grid-kelly');
  }

  function slotNodes(slots) {
    if (!slots.length) return [el('span', 'empty', 'No slots.')];
    return slots.map((s) => {
      const leg = (name) => {
        const st = str(s[name]) || '—';
        return el('span', 'leg leg-' + slug(st), name + ' ' + st);
      };
      const chip = el('span', 'gc-slot', el('b', '', '#' + (num(s.slot) === null ? '?' : s.slot)), ' ', leg('A'), ' ', leg('B'));
      return tid(chip, 'grid-slot');
    });
  }

  function orderNodes(orders, now, price) {
    if (!orders.length) return [el('div', 'empty', 'No open orders.')];
    const right = [3, 4, 5];
    const body = orders.map((o) => {
      const row = cells(el('tr', o.recovery === true ? 'recovery' : ''), [
        slotLeg(o.slot, o.leg), sideSpan(o.side), str(o.role) || '—',
        price(o.price), fmtBase(o.volume),
        num(o.placed_at) === null || now === null ? '—' : fmtDur(now - o.placed_at),
        str(o.regime_at_entry) || '—',
        el('span', '', o.recovery === true ? el('span', 'pill warn', 'recovery') : null,
          // ``open: false`` (beyond the contract): the engine has not had it confirmed on the book yet.
          o.open === false ? el('span', 'pill', 'pending') : null),
        el('span', 'mono', str(o.id)),
      ], right, [0, 5, 8]);
      row.title = 'placed ' + fmtStamp(o.placed_at);
      return tid(row, 'grid-order');
    });
    return [table(['slot', 'side', 'role', 'price', 'volume', 'age', 'regime', '', 'id'], body, right)];
  }

  function fillNodes(fills, price) {
    if (!fills.length) return [el('div', 'empty', 'No fills yet.')];
    const right = [4, 5, 6];
    const body = fills.map((f) => {
      const row = cells(el('tr', ''), [
        el('span', 'when', fmtClock(f.ts)), slotLeg(f.slot, f.leg), sideSpan(f.side), str(f.role) || '—',
        price(f.price), fmtBase(f.volume), fmtQuote(f.fee_quote, false, true),
      ], right);
      row.title = str(f.id) + ' · ' + fmtStamp(f.ts);
      return tid(row, 'grid-fill');
    });
    return [table(['time', 'slot', 'side', 'role', 'price', 'volume', 'fee'], body, right)];
  }

  function cycleNodes(cycles, price) {
    if (!cycles.length) return [el('div', 'empty', 'No completed cycles yet.')];
    const right = [3, 4, 5];
    const body = cycles.map((c) => {
      const row = cells(el('tr', ''), [
        el('span', 'when', fmtClock(c.closed_at)), slotLeg(c.slot, c.leg), sideSpan(c.entry_side),
        price(c.entry_price) + ' → ' + price(c.exit_price), fmtBase(c.volume),
        el('span', signClass(c.net_quote), fmtQuote(c.net_quote, true, true)), str(c.regime_at_entry) || '—',
      ], right);
      row.title = 'gross ' + fmtQuote(c.gross_quote, true, true) + ' · fees ' + fmtQuote(c.fees_quote, false, true) +
        ' · ' + fmtStamp(c.closed_at);
      return tid(row, 'grid-cycle');
    });
    return [table(['closed', 'slot', 'entry', 'entry → exit', 'volume', 'net', 'regime'], body, right)];
  }

  function noteNodes(notes, now) {
    if (!notes.length) return [el('li', 'empty', 'No notes.')];
    return notes.map((n) => {
      const when = el('span', 'when num', fmtClock(n.ts));
      when.title = ago(now, n.ts);
      const kind = str(n.kind);
      return tid(el('li', '', when, ' ', el('span', 'pill kind k-' + slug(kind), (Object.hasOwn(NOTE_KINDS, kind) ? NOTE_KINDS[kind] : kind) || 'note'), ' ',
        el('span', 'msg', str(n.message))), 'grid-note');
    });
  }

  /** The trades backfill: a progress block while it works, one line once it is done or cannot run. */
  function renderBackfill(b, now) {
    const box = $('backfill');
    if (!b) {
      show(box, false);
      redraw(box, 'none', () => []);
      return;
    }
    let st = str(b.state);
    if (!st) st = b.enabled === false ? 'disabled' : 'unknown';
    const written = obj(b.candles_written) || {};
    const writtenKeys = Object.keys(written).sort((x, y) => Number(x) - Number(y));
    const writtenText = writtenKeys.length
      ? writtenKeys.map((k) => fmtInt(written[k]) + ' × ' + k + 'm').join(' · ')
      : '—';
    const totalWritten = writtenKeys.reduce((sum, k) => sum + (num(written[k]) || 0), 0);
    const line = { disabled: 'Trades backfill: disabled.',
      unavailable: 'Trades backfill: not available (this market has no trade history).',
      done: 'Trades backfill done: ' + fmtInt(totalWritten) + ' candles written (' + writtenText + ').' }[st];
    show(box, true);
    box.className = 'backfill bf-' + slug(st) + (line ? ' bf-line' : '');
    redraw(box, JSON.stringify([b, now]), () => {
      if (line) return [el('span', '', line)];
      const pct = num(b.pct);
      const bar = tid(el('div', 'bar thin', el('div', 'fill')), 'backfill-bar');
      bar.firstChild.style.width = Math.max(0, Math.min(100, pct || 0)) + '%';
      const pill = tid(el('span', 'pill ' + (st === 'error' ? 'warn' : st === 'running' ? 'good' : ''),
        st === 'error' ? 'error · will retry' : st), 'backfill-state');
      const eta = num(b.eta_sec);
      const progress = tid(el('div', 'bf-progress num',
        tid(el('b', '', pct === null ? '—' : pct.toFixed(1) + '%'), 'backfill-pct'),
        el('span', 'muted', ' · phase '), tid(el('span', '', str(b.phase) ? str(b.phase) : '—'), 'backfill-phase'),
        el('span', 'muted', ' · ETA '), tid(el('span', '', eta === null ? 'unknown' : fmtEta(eta)), 'backfill-eta')),
      'backfill-progress');
      const err = b.last_error
        ? tid(el('dd', 'err-text', str(b.last_error) + (num(b.last_error_at) !== null ? ' · ' + ago(now, b.last_error_at) : '')),
          'backfill-error')
        : el('dd', 'faint', 'none');
      return [
        el('div', 'feed-head', el('b', '', 'Trades backfill'), pill),
        bar,
        progress,
        el('dl', 'kv',
          el('dt', '', 'Range'), el('dd', 'num', fmtStamp(b.from_ts) + ' → ' + fmtStamp(b.to_ts)),
          el('dt', '', 'At'), el('dd', 'num', fmtStamp(b.cursor_ts)),
          el('dt', '', 'Requests'), tid(el('dd', 'num', fmtInt(b.requests) + ' · ' + fmtInt(b.trades) + ' trades'),
            'backfill-requests'),
          el('dt', '', 'Written'), tid(el('dd', 'num', writtenText), 'backfill-written'),
          el('dt', '', 'Last error'), err),
      ];
    });
  }

  /**
   * The candle/state store: backend, file and state in one line; for Supabase also what waits
   * to be written; when degraded, since when and the last error. No block (an older bot): nothing.
   */
  function renderStore(st, now) {
    const box = $('store');
    const alert = $('store-alert');
    const degraded = Boolean(st) && st.state === 'degraded';
    $('pipeline-card').setAttribute('data-store', st ? (degraded ? 'degraded' : 'ok') : '');
    show(box, Boolean(st));
    show(alert, degraded);
    if (!st) {
      redraw(box, 'none', () => []);
      return;
    }
    const since = num(st.degraded_since);
    alert.title = degraded
      ? 'the store is degraded' + (since === null ? '' : ' since ' + fmtClock(since)) +
        (st.last_error ? ': ' + str(st.last_error) : '')
      : '';
    redraw(box, JSON.stringify([st, now]), () => storeNodes(st, now, degraded));
  }

  function storeNodes(st, now, degraded) {
    const backend = str(st.backend);
    const remote = backend === 'supabase';
    const state = str(st.state);
    const badge = tid(el('span', 'store-badge' + (degraded ? ' store-degraded' : state === 'ok' ? ' store-ok' : ''),
      state || 'state —'), 'store-state');
    const path = str(st.local_path);
    const head = el('div', 'feed-head',
      el('b', '', 'Store'), tid(el('span', 'pill', backend || '—'), 'store-backend'), badge,
      path ? tid(el('span', 'store-path mono', (remote ? 'local mirror ' : '') + path), 'store-path') : null);
    const facts = [];
    if (remote) {
      const pending = num(st.pending_writes);
      facts.push(['Pending writes', tid(el('span', 'num' + (pending > 0 ? ' over' : ''), fmtInt(pending)), 'store-pending'),
        pending > 0 ? el('span', 'faint', ' kept locally, not yet in Supabase') : null]);
      const rejected = num(st.rejected_writes);
      if (rejected > 0) {
        facts.push(['Rejected writes', tid(el('span', 'num neg', fmtInt(rejected)), 'store-rejected'),
          el('span', 'faint', ' refused by Supabase, kept locally only')]);
      }
      const last = num(st.last_remote_write_at);
      const lastNode = tid(el('span', 'num', last === null ? 'never' : ago(now, last)), 'store-last-write');
      lastNode.title = fmtStamp(last);
      facts.push(['Last remote write', lastNode]);
    }
    if (degraded) {
      const since = num(st.degraded_since);
      facts.push(['Degraded', tid(el('span', 'num neg', since === null ? 'since —'
        : 'since ' + fmtClock(since) + (now === null ? '' : ' (' + ago(now, since) + ')')), 'store-since')]);
      const errAt = num(st.last_error_at);
      facts.push(['Last error', tid(el('span', 'err-text', (str(st.last_error) || 'none recorded') +
        (errAt === null ? '' : ' · ' + ago(now, errAt))), 'store-error')]);
    }
    return facts.length ? [head, tid(el('dl', 'kv', ...kvRows(facts)), 'store-facts')] : [head];
  }

  // ---------- AI regime advisor (SPEC sections 6, 7 and 11) ----------
  const AGREEMENT_LABELS = { agree: 'agree', ai_upgrade: 'AI upgrade', ai_downgrade: 'AI downgrade', ai_flip: 'AI flip' };
  const DISAGREE_HEADLINES = {
    ai_upgrade: 'AI disagrees: it would raise the tier',
    ai_downgrade: 'AI disagrees: it would lower the tier',
    ai_flip: 'AI disagrees: same tier, other direction',
  };
  const ADVISOR_ACTIONS = {
    apply: { action: 'ai_regime_override', yes: 'Apply override', cls: 'apply' },
    dismiss: { action: 'ai_regime_dismiss', yes: 'Dismiss', cls: '' },
    revert: { action: 'ai_regime_revert', yes: 'Revert to mechanical', cls: '' },
  };
  const ADVISOR_HISTORY_ROWS = 6;
  const advisor = {
    view: null,     // {a, st, mech, now} from the last status drawn, for the countdowns and the actions
    syncNow: null,  // the status `now` the countdowns count from
    syncAt: 0,      // browser ms when that status was first drawn
    pending: null,  // {kind, key, opener} while the confirmation is open
    busy: false,    // an action is on its way to the bot
  };
  const drawnKeys = new WeakMap();

  /** Write text only when it changed, so the polling redraw keeps a reader's selection. */
  function put(node, text) {
    text = str(text);
    if (node.textContent !== text) node.textContent = text;
  }
  /** Rebuild the children of ``node`` only when ``key`` (a summary of their data) changed. */
  function redraw(node, key, build) {
    if (drawnKeys.get(node) === key) return;
    drawnKeys.set(node, key);
    node.replaceChildren(...build());
  }
  function tierLabel(tier) { return num(tier) === null ? 'Tier —' : 'Tier ' + tier; }
  function tierDir(tier, dir) { return tierLabel(tier) + ' ' + (str(dir) || '—'); }
  function dirClass(dir) { return 'direction d-' + str(dir).replace(/[^a-z_]/g, ''); }
  function agreementLabel(a) { return AGREEMENT_LABELS[a] || str(a) || '—'; }
  function slug(x) { return str(x).toLowerCase().replace(/[^a-z_]/g, ''); }
  /** A count-down: whole seconds rounded up, so it shows the status value until a second has passed. */
  function fmtCountdown(sec) { return fmtDur(Math.ceil(sec)); }
  /** A configured length: 30m, 1h, 1h 30m, 45s. */
  function fmtSpan(sec) {
    const v = num(sec);
    if (v === null) return '—';
    const s = Math.round(v);
    if (s > 0 && s % 3600 === 0) return s / 3600 + 'h';
    if (s > 0 && s < 3600 && s % 60 === 0) return s / 60 + 'm';
    return fmtDur(s);
  }
  /** A hit rate given as a fraction (hits / scored). */
  function fmtRate(r) { const v = num(r); return v === null ? '—' : Math.round(v * 100) + '%'; }

  function advisorState(a) {
    if (!a || a.enabled !== true) return 'disabled';
    if (obj(a.override) && a.override.active === true) return 'override';
    const op = obj(a.opinion);
    if (!op) return 'waiting';
    return op.agreement === 'agree' || a.dismissed === true ? 'agree' : 'disagree';
  }

  /** Why Apply would be refused right now, or '' when it would pass every rail. */
  function applyBlocker(a, op) {
    if (!op) return 'there is no opinion to apply';
    const floor = num(a.conviction_floor), conv = num(op.conviction);
    const belowFloor = floor !== null && conv !== null && conv < floor;
    if (op.applicable === true && !belowFloor) return '';
    if (op.blocked_reason) return str(op.blocked_reason);
    if (belowFloor) return 'conviction ' + conv + ' is below the floor of ' + floor;
    return 'the bot would refuse it right now';
  }

  /** The opinion an action would act on; the confirmation is withdrawn when this changes. */
  function actionKey(kind, v) {
    if (!v) return null;
    const op = obj(v.a.opinion), ov = obj(v.a.override);
    if (kind === 'revert') {
      return v.st === 'override' ? JSON.stringify([kind, ov.applied_at, ov.tier, ov.direction]) : null;
    }
    if (v.st !== 'disagree' || !op) return null;
    if (kind === 'apply' && applyBlocker(v.a, op) !== '') return null;
    return JSON.stringify([kind, op.ts, op.recommended_tier, op.recommended_direction,
      obj(op.apply_preview), v.mech.tier, v.mech.direction]);
  }

  function renderAdvisor(s, now) {
    const a = obj(s.ai_regime_advisor);
    const rt = obj(s.regime_tier);
    const st = advisorState(a);
    const card = $('advisor-card');
    card.setAttribute('data-state', st);
    card.classList.toggle('advisor-off', st === 'disabled');
    show($('advisor-off'), st === 'disabled');
    show($('advisor-on'), st !== 'disabled');
    // Count down from the status that carried the numbers: a poll that brings the
    // same status again must not set the clocks back.
    if (now === null || now !== advisor.syncNow) {
      advisor.syncNow = now;
      advisor.syncAt = Date.now();
    }
    advisor.view = st === 'disabled' ? null : { a, st, mech: obj(rt && rt.mechanical) || {}, now };
    if (advisor.view) {
      drawAdvisorOpinion(advisor.view);
      drawAdvisorSide(advisor.view);
    }
    dropStaleConfirm();
    syncAdvisorActions();
    tickAdvisor();
  }

  function fillSide(node, label, tier, dir, visible, primary) {
    show(node, visible);
    node.classList.toggle('primary', Boolean(primary));
    if (!visible) return;
    redraw(node, JSON.stringify([label, tier, dir]), () => [
      el('span', 'cmp-label', label + ':'), ' ',
      el('b', 'cmp-tier', tierLabel(tier)), ' ',
      el('span', dirClass(dir), str(dir) || '—'),
    ]);
  }

  function drawAdvisorOpinion(v) {
    const { a, st, mech, now } = v;
    const op = obj(a.opinion);
    const ov = obj(a.override) || {};
    const floor = num(a.conviction_floor);
    const dismissed = st === 'agree' && a.dismissed === true;
    // While an override runs, an opinion that came after it is shown apart, compactly.
    const newer = st === 'override' && op !== null && num(op.ts) !== null && num(ov.applied_at) !== null &&
      op.ts > ov.applied_at;
    const showOpinion = op !== null && (st === 'agree' || st === 'disagree' || (st === 'override' && !newer));

    const headline = $('advisor-headline');
    let text = '';
    if (st === 'waiting') text = 'waiting for the first opinion';
    else if (st === 'override') text = 'AI override active: the grid follows it instead of the mechanical tier';
    else if (typeof op.headline === 'string' && op.headline) text = op.headline;  // names a direction flip too
    else if (op.agreement === 'agree') text = 'AI agrees with the mechanical tier';
    else text = DISAGREE_HEADLINES[op.agreement] || 'AI disagrees with the mechanical tier';
    put(headline, text);
    headline.className = 'advisor-headline ' + st;

    const disagreeing = st === 'disagree' || (dismissed && op.agreement !== 'agree');
    show($('advisor-cmp'), st !== 'waiting');
    fillSide($('advisor-override'), 'Override', ov.tier, ov.direction, st === 'override', true);
    show($('advisor-vs-override'), st === 'override');
    fillSide($('advisor-mech'), st === 'override' ? 'Mechanical would be' : 'Mechanical',
      mech.tier, mech.direction, st === 'override' || disagreeing, false);
    show($('advisor-vs-ai'), disagreeing);
    fillSide($('advisor-ai'), 'AI', op && op.recommended_tier, op && op.recommended_direction,
      st === 'agree' || st === 'disagree', true);

    const preview = op ? obj(op.apply_preview) : null;
    const clamp = $('advisor-clamp');
    const clamped = st === 'disagree' && preview !== null && preview.clamped === true;
    put(clamp, clamped
      ? 'applies tier ' + str(preview.tier) + ' ' + str(preview.direction) + ' (one step from mechanical)'
      : '');
    show(clamp, clamped);
    const note = $('advisor-dismissed');
    put(note, dismissed ? 'dismissed: the mechanical tier stays; the next opinion is shown as usual' : '');
    show(note, dismissed);

    const conv = st === 'override' ? num(ov.source_conviction) : op ? num(op.conviction) : null;
    const below = conv !== null && floor !== null && conv < floor;
    let convText = conv === null ? '—' : String(conv);
    if (st === 'disagree' && conv !== null && floor !== null) {
      convText += below ? ' (below the floor of ' + floor + ')' : ' (floor ' + floor + ')';
    }
    const convNode = $('advisor-conviction');
    put(convNode, convText);
    convNode.classList.toggle('below-floor', st === 'disagree' && below);
    put($('advisor-conviction-label'), st === 'override' ? 'Source conviction' : 'Conviction');
    show($('advisor-conviction-row'), st === 'override' || (op !== null && st !== 'waiting'));
    const meter = $('advisor-meter');
    show(meter, conv !== null);
    meter.className = 'meter' + (below ? ' below' : '');
    meter.querySelector('.fill').style.width = Math.max(0, Math.min(100, conv || 0)) + '%';
    const floorMark = meter.querySelector('.floor');
    show(floorMark, floor !== null);
    floorMark.style.left = Math.max(0, Math.min(100, floor || 0)) + '%';
    meter.title = conv === null ? '' : 'conviction ' + conv + (floor === null ? '' : ' · floor ' + floor);

    show($('advisor-remaining-row'), st === 'override');
    put($('advisor-expires'), st === 'override' && num(ov.expires_at) !== null
      ? 'until ' + fmtClock(ov.expires_at) + (num(ov.applied_at) !== null ? ' · applied ' + fmtClock(ov.applied_at) : '')
      : '');

    show($('advisor-panelist-row'), showOpinion);
    put($('advisor-panelist'), showOpinion ? panelistText(op, a.panel, now) : '');
    const rationale = $('advisor-rationale');
    put(rationale, showOpinion ? str(op.rationale) || '(no rationale given)' : '');
    show(rationale, showOpinion);
    const watch = showOpinion ? str(op.watch_for) : '';
    put($('advisor-watch'), watch);
    show($('advisor-watch-line'), watch !== '');

    const newerNode = $('advisor-newer');
    put(newerNode, newer
      ? 'Newer opinion, ' + ago(now, op.ts) + ': ' + tierDir(op.recommended_tier, op.recommended_direction) +
        ' · conviction ' + (num(op.conviction) === null ? '—' : op.conviction) + ' · ' +
        agreementLabel(op.agreement) + (op.panelist ? ' · ' + str(op.panelist) : '')
      : '');
    newerNode.title = newer ? str(op.rationale) : '';
    show(newerNode, newer);
  }

  function panelistText(op, panel, now) {
    const member = (Array.isArray(panel) ? panel : []).find((p) => obj(p) && p.name === op.panelist);
    const parts = [str(op.panelist) || 'unknown panelist'];
    if (member && member.model) parts.push(str(member.model) + (member.kind ? ' (' + str(member.kind) + ')' : ''));
    const latency = num(op.latency_sec);
    if (latency !== null) parts.push('answered in ' + latency.toFixed(1) + ' s');
    if (num(op.ts) !== null && num(now) !== null) parts.push(ago(now, op.ts));
    return parts.join(' · ');
  }

  function drawAdvisorSide(v) {
    const a = v.a;
    const err = $('advisor-error');
    put(err, a.last_error ? 'last error: ' + str(a.last_error) : '');
    show(err, Boolean(a.last_error));

    // Panelists are asked in order and the first one not cooling down goes first.
    const inflight = $('advisor-inflight');
    const ready = (Array.isArray(a.panel) ? a.panel : []).filter((p) => obj(p) && !(num(p.cooldown_remaining_sec) > 0));
    put(inflight, a.in_flight === true ? (ready.length ? 'asking ' + str(ready[0].name) + '…' : 'consulting…') : '');
    show(inflight, a.in_flight === true);

    const sc = obj(a.scorecard);
    redraw($('advisor-scorecard'), JSON.stringify(sc), () => scorecardNodes(sc));
    const items = (Array.isArray(a.history) ? a.history : []).filter(obj).slice()
      .sort((x, y) => (num(y.ts) || 0) - (num(x.ts) || 0))
      .slice(0, ADVISOR_HISTORY_ROWS);
    redraw($('advisor-history'), JSON.stringify(items), () => historyNodes(items));
  }

  function scorecardNodes(sc) {
    if (!sc) return [el('div', 'empty', 'No scorecard yet.')];
    const horizon = num(sc.horizon_sec);
    const summary = el('div', 'muted num', fmtInt(sc.scored) + ' scored · ' + fmtInt(sc.pending) + ' pending' +
      (horizon === null ? '' : ' · ' + fmtSpan(horizon) + ' horizon'));
    const byPanelist = Object.entries(obj(sc.by_panelist) || {});
    const agreements = obj(sc.by_agreement) || {};
    const byAgreement = Object.keys(AGREEMENT_LABELS).filter((k) => k in agreements).map((k) => [k, agreements[k]])
      .concat(Object.entries(agreements).filter(([k]) => !(k in AGREEMENT_LABELS)));
    if (!byPanelist.length && !byAgreement.length) return [summary, el('div', 'empty', 'Nothing scored yet.')];
    const body = el('tbody');
    const group = (title, entries, label) => {
      const head = el('th', '', title);
      head.colSpan = 3;
      body.appendChild(el('tr', 'group', head));
      for (const [key, row] of entries) {
        const r = obj(row) || {};
        body.appendChild(el('tr', '', el('th', '', label(key)),
          el('td', '', fmtInt(r.hits) + ' / ' + fmtInt(r.scored)), el('td', '', fmtRate(r.hit_rate))));
      }
      if (!entries.length) body.appendChild(el('tr', '', el('td', 'faint', 'none yet')));
    };
    group('by panelist', byPanelist, (k) => k);
    group('by agreement', byAgreement, agreementLabel);
    const table = el('table', 'score',
      el('thead', '', el('tr', '', el('th', '', ''), el('th', '', 'hits / scored'), el('th', '', 'hit rate'))),
      body);
    return [summary, table];
  }

  function historyNodes(items) {
    if (!items.length) return [el('div', 'empty', 'No opinions yet.')];
    const head = el('tr', '');
    for (const label of ['time', 'mech → AI', 'conv.', 'agreement', 'action']) head.appendChild(el('th', '', label));
    const body = el('tbody');
    for (const h of items) {
      const when = el('td', 'when', fmtClock(h.ts));
      when.title = fmtStamp(h.ts);
      const conv = num(h.conviction);
      const action = str(h.action) || 'none';
      const row = el('tr', '', when,
        el('td', '', str(h.mechanical_tier) + ' → ' + str(h.ai_tier) + ' ',
          el('span', dirClass(h.ai_direction), str(h.ai_direction) || '—')),
        el('td', '', conv === null ? '—' : String(conv)),
        el('td', 'agr-' + slug(h.agreement), agreementLabel(h.agreement)),
        el('td', 'act-' + slug(action), action === 'none' ? '—' : action));
      if (h.panelist) row.title = 'panelist ' + str(h.panelist);
      body.appendChild(row);
    }
    return [el('table', 'hist', el('thead', '', head), body)];
  }

  /** The parts that change every second: countdowns and ages, counted from the status. */
  function tickAdvisor() {
    const v = advisor.view;
    if (!v) return;
    const a = v.a;
    const elapsed = Math.max(0, (Date.now() - advisor.syncAt) / 1000);
    const next = num(a.next_run_in_sec);
    put($('advisor-next-run'), next === null ? 'next check —'
      : next - elapsed > 0 ? 'next check in ' + fmtCountdown(next - elapsed) : 'next check due');
    let age = num(a.last_run_age_sec);
    if (age === null && num(a.last_run_ts) !== null && num(v.now) !== null) age = v.now - a.last_run_ts;
    const lastRun = $('advisor-last-run');
    put(lastRun, age === null ? 'no run yet' : 'last run ' + fmtDur(age + elapsed) + ' ago');
    lastRun.title = num(a.last_run_ts) === null ? '' : fmtStamp(a.last_run_ts);
    if (v.st === 'override') {
      const left = num(obj(a.override).remaining_sec);
      put($('advisor-override-remaining'), left === null ? '—'
        : left - elapsed > 0 ? fmtCountdown(left - elapsed) : 'ending now');
    }
    const members = (Array.isArray(a.panel) ? a.panel : []).filter(obj).map((p) => {
      const cool = num(p.cooldown_remaining_sec);
      const coolLeft = cool === null ? 0 : cool - elapsed;
      return [str(p.name), str(p.kind), str(p.model), coolLeft > 0 ? fmtCountdown(coolLeft) : '',
        num(p.consecutive_failures) || 0];
    });
    redraw($('advisor-panel'), JSON.stringify(members), () => members.length
      ? members.map(([name, kind, model, cooling, failures]) => {
        const li = el('li', '', name + (kind ? ' · ' + kind : ''));
        if (cooling) li.appendChild(el('span', 'cool', ' · cooling down ' + cooling));
        if (failures) li.appendChild(el('span', 'cool', ' · ' + failures + (failures === 1 ? ' failure' : ' failures')));
        li.title = model;
        return li;
      })
      : [el('li', 'empty', 'no panelists configured')]);
  }

  function syncAdvisorActions() {
    const v = advisor.view;
    const st = v ? v.st : 'disabled';
    const asking = advisor.pending !== null || advisor.busy;
    show($('advisor-actions'), !asking && (st === 'disagree' || st === 'override'));
    const apply = $('advisor-apply');
    show(apply, st === 'disagree');
    show($('advisor-dismiss'), st === 'disagree');
    show($('advisor-revert'), st === 'override');
    const ttl = v ? num(v.a.default_ttl_sec) : null;
    put(apply, 'Apply Override' + (ttl === null ? '' : ' (' + fmtSpan(ttl) + ')'));
    const reason = st === 'disagree' ? applyBlocker(v.a, obj(v.a.opinion)) : '';
    apply.disabled = reason !== '';
    const blocked = $('advisor-blocked');
    put(blocked, reason);
    show(blocked, reason !== '');
  }

  function confirmText(kind, v) {
    const a = v.a, mech = v.mech;
    const op = obj(a.opinion) || {}, ov = obj(a.override) || {};
    const mechText = 'the mechanical ' + tierDir(mech.tier, mech.direction);
    if (kind === 'apply') {
      const preview = obj(op.apply_preview);
      const target = preview ? tierDir(preview.tier, preview.direction) : tierDir(op.recommended_tier, op.recommended_direction);
      const ttl = num(a.default_ttl_sec);
      return 'Apply an AI override of ' + target + (ttl === null ? '' : ' for ' + fmtSpan(ttl)) + '? The grid leaves ' +
        mechText + ' until the override expires or you revert it.' +
        (preview && preview.clamped ? ' (The AI said ' + tierDir(op.recommended_tier, op.recommended_direction) +
          '; an override moves one tier at a time.)' : '');
    }
    if (kind === 'dismiss') {
      return 'Dismiss this disagreement? The grid stays on ' + mechText +
        ' and the card stays neutral until the next opinion.';
    }
    const elapsed = Math.max(0, (Date.now() - advisor.syncAt) / 1000);
    const left = num(ov.remaining_sec);
    return 'End the override (' + tierDir(ov.tier, ov.direction) +
      (left === null ? '' : ', ' + fmtCountdown(Math.max(0, left - elapsed)) + ' left') +
      ') now and go back to ' + mechText + '?';
  }

  function showAdvisorResult(text, cls) {
    const node = $('advisor-result');
    put(node, text);
    node.className = 'advisor-result ' + (cls || '');
    show(node, text !== '');
  }

  function askAdvisor(kind, opener) {
    if (advisor.busy) return;
    const key = actionKey(kind, advisor.view);
    if (key === null) return;
    advisor.pending = { kind, key, opener };
    put($('advisor-confirm-text'), confirmText(kind, advisor.view));
    const yes = $('advisor-confirm-yes');
    put(yes, ADVISOR_ACTIONS[kind].yes);
    yes.className = ADVISOR_ACTIONS[kind].cls;
    $('advisor-confirm').className = 'confirm kind-' + kind;
    showAdvisorResult('', '');
    show($('advisor-confirm'), true);
    syncAdvisorActions();
    $('advisor-confirm-no').focus();
  }

  function closeAdvisorConfirm(restoreFocus) {
    const pending = advisor.pending;
    advisor.pending = null;
    show($('advisor-confirm'), false);
    syncAdvisorActions();
    const opener = pending && pending.opener;
    if (restoreFocus && opener && !opener.hidden && !opener.disabled) opener.focus();
  }

  /** A confirmation describes one opinion or override: when that changes, withdraw it unsent. */
  function dropStaleConfirm() {
    const pending = advisor.pending;
    if (!pending || actionKey(pending.kind, advisor.view) === pending.key) return;
    closeAdvisorConfirm(false);
    showAdvisorResult('The advisor changed while you were confirming, so nothing was sent. ' +
      'Check the card and choose again.', 'warn');
  }

  async function sendAdvisorAction() {
    const pending = advisor.pending;
    if (!pending || advisor.busy) return;
    if (actionKey(pending.kind, advisor.view) !== pending.key) {
      dropStaleConfirm();
      return;
    }
    advisor.busy = true;  // set before the first await: a second click sends nothing
    closeAdvisorConfirm(false);
    showAdvisorResult('sending…', 'busy');
    let text, cls = 'bad', unauthorised = false;
    try {
      const resp = await apiFetch('/api/action', { action: ADVISOR_ACTIONS[pending.kind].action });
      let data = null;
      try { data = obj(await resp.json()); } catch (e) { data = null; }
      if (resp.ok && data && data.ok === true) {
        text = str(data.message) || 'done';
        cls = 'good';
      } else {
        const reason = (data && str(data.error)) || resp.statusText || 'no reason given';
        text = (resp.status >= 400 && resp.status < 500 ? 'refused (' : 'failed (') + resp.status + '): ' + reason;
        unauthorised = resp.status === 401;
      }
    } catch (err) {
      text = err && err.name === 'AbortError'
        ? 'no answer from the bot within ' + FETCH_TIMEOUT_MS / 1000 + ' s: the action may or may not have been ' +
          'applied; the card will show it once the bot answers'
        : 'no answer from the bot (network error): the action may not have been applied; ' +
          'check the card once the connection is back';
    }
    advisor.busy = false;
    showAdvisorResult(text, cls);
    syncAdvisorActions();
    if (unauthorised) {
      state.seq++;  // a status request still on its way is answered with the same 401
      clearTimeout(state.timer);
      onUnauthorised();
    } else {
      poll();  // show what the action changed now, not at the next poll
    }
  }
  // ---------- wiring ----------
  $('token-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const value = $('token-input').value.trim();
    if (!value) return;
    state.token = value;
    state.tokenJustSubmitted = true;
    writeToken(value);
    $('token-input').value = '';
    show($('token-error'), false);
    poll();
  });
  $('forget-token').addEventListener('click', (ev) => {
    ev.preventDefault();
    state.token = '';
    writeToken('');
    poll();
  });

  $('advisor-apply').addEventListener('click', (ev) => askAdvisor('apply', ev.currentTarget));
  $('advisor-dismiss').addEventListener('click', (ev) => askAdvisor('dismiss', ev.currentTarget));
  $('advisor-revert').addEventListener('click', (ev) => askAdvisor('revert', ev.currentTarget));
  $('advisor-confirm-yes').addEventListener('click', sendAdvisorAction);
  $('advisor-confirm-no').addEventListener('click', () => closeAdvisorConfirm(true));
  $('advisor-confirm').addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape') closeAdvisorConfirm(true);
  });

  buildModelCard('primary', 'Primary');
  buildModelCard('secondary', 'Secondary');
  setInterval(renderConn, 1000);
  setInterval(tickAdvisor, 1000);
  poll();
})();
