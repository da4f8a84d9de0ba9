// The report's confusion-matrix explorer: the heatmap of any subset of classes (all, the top N most confused,
// one class and its partners, or superclasses/clusters collapsed), and, on a click on a cell off the diagonal
// or on a row of the pairs table, that cell's images with their true- and predicted-class CAMs, worst first.
// Everything it needs is in the page (no request is made): #cm-data holds the numbers, #cell-sheet-K the
// K-th JPEG sheet of image tiles, decoded only when a cell on it is first opened.
(function () {
  'use strict';
  var D = JSON.parse(document.getElementById('cm-data').textContent);
  var n = D.n, plot = document.getElementById('confusion-matrix');
  var pos = new Array(n), cellOf = new Map(), involved = new Float64Array(n), k, c;
  D.order.forEach(function (cls, i) { pos[cls] = i; });
  for (k = 0; k < D.cells.length / 5; k++) {
    var t = D.cells[5 * k], p = D.cells[5 * k + 1];
    cellOf.set(t * n + p, k);
    involved[t] += D.cells[5 * k + 2];
    involved[p] += D.cells[5 * k + 2];
  }
  function count(t, p) {
    if (t === p) return D.correct[t];
    var i = cellOf.get(t * n + p);
    return i === undefined ? 0 : D.cells[5 * i + 2];
  }
  function plural(word) { return word.slice(-1) === 's' ? word + 'es' : word + 's'; }
  function inOrder(ids) { return ids.slice().sort(function (a, b) { return pos[a] - pos[b]; }); }
  function allIds() { var a = []; for (var i = 0; i < n; i++) a.push(i); return a; }
  function topN(N) {
    return inOrder(allIds().sort(function (a, b) { return involved[b] - involved[a] || pos[a] - pos[b]; }).slice(0, N));
  }
  function partners(cls, N) {
    var score = function (o) { return count(cls, o) + count(o, cls); };
    var others = allIds().filter(function (o) { return o !== cls && score(o) > 0; });
    others.sort(function (a, b) { return score(b) - score(a) || pos[a] - pos[b]; });
    return inOrder([cls].concat(others.slice(0, N)));
  }
  var groupIds = [], members = {};
  if (D.groups) {
    D.order.forEach(function (cls) {
      var g = D.groups[cls];
      if (!(g in members)) { members[g] = []; groupIds.push(g); }
      members[g].push(cls);
    });
  }

  // ---- the heatmap of the current view
  var view = null;
  var colour = document.getElementById('cm-colour'), scope = document.getElementById('cm-scope');
  var showing = document.getElementById('cm-showing'), search = document.getElementById('cm-search');
  function setView(mode, ids, label) {
    view = {mode: mode, ids: ids, label: label};
    window.cmView = view;
    draw();
  }
  function draw() {
    var ids = view.ids, m = ids.length, grouped = view.mode === 'groups';
    var rowsOf = grouped ? function (g) { return members[g]; } : function (cls) { return [cls]; };
    var label = grouped ? function (g) { return D.group_labels[g]; } : function (cls) { return D.labels[cls]; };
    var hoverName = grouped ? label : function (cls) {
      return D.groups && D.group_kind === 'superclass' ? D.labels[cls] + ' · ' + D.group_labels[D.groups[cls]] : D.labels[cls];
    };
    var support = ids.map(function (i) { return rowsOf(i).reduce(function (s, cls) { return s + D.support[cls]; }, 0); });
    var z = [], custom = [], mode = colour.value, zmax = 0;
    for (var r = 0; r < m; r++) {
      var zr = [], cr = [], a = rowsOf(ids[r]);
      for (var q = 0; q < m; q++) {
        var b = rowsOf(ids[q]), v = 0;
        for (var i = 0; i < a.length; i++) for (var j = 0; j < b.length; j++) v += count(a[i], b[j]);
        var pct = support[r] > 0 ? 100 * v / support[r] : null;
        var shown = mode === 'counts' ? v : (mode === 'errors' && r === q) || pct === null ? null
          : Math.round(pct * 10) / 10;
        if (shown !== null && shown > zmax) zmax = shown;
        zr.push(shown);
        cr.push([hoverName(ids[r]), hoverName(ids[q]), v, pct === null ? 'n/a (no images)' : pct.toFixed(1) + '%']);
      }
      z.push(zr); custom.push(cr);
    }
    var ticks = ids.map(function (_, i) { return i; }), font = m <= 20 ? 12 : m <= 50 ? 10 : 8;
    var cell = m <= 12 ? 48 : m <= 20 ? 32 : m <= 50 ? 16 : m <= 120 ? 9 : 5;
    var axis = {tickmode: 'array', tickvals: ticks, ticktext: ids.map(label), tickfont: {size: font},
                showticklabels: m <= 150, showgrid: false, zeroline: false, automargin: true};
    var bar = {counts: 'count', pct: 'row %', errors: 'row %<br>(errors)'}[mode];
    // superclass blocks outlined, as in the full matrix: runs of one superclass along the rows
    var shapes = [];
    if (!grouped && D.groups && D.group_kind === 'superclass') {
      for (var s0 = 0, e = 1; e <= m; e++) {
        if (e === m || D.groups[ids[e]] !== D.groups[ids[s0]]) {
          shapes.push({type: 'rect', x0: s0 - 0.5, x1: e - 0.5, y0: s0 - 0.5, y1: e - 0.5,
                       line: {color: '#d62728', width: 1}, fillcolor: 'rgba(0,0,0,0)'});
          s0 = e;
        }
      }
    }
    Plotly.react(plot, [{
      type: 'heatmap', z: z, x: ticks, y: ticks, customdata: custom, zmin: 0, zmax: zmax > 0 ? zmax : 1,
      colorscale: D.colorscale, colorbar: {title: {text: bar}}, xgap: m <= 50 ? 1 : 0, ygap: m <= 50 ? 1 : 0,
      hovertemplate: 'true: %{customdata[0]}<br>predicted: %{customdata[1]}<br>count: %{customdata[2]}' +
                     '<br>row %: %{customdata[3]}<extra></extra>',
      texttemplate: m <= 20 ? '%{z}' : ''
    }], {
      shapes: shapes, height: Math.max(460, cell * m + 260), margin: {l: 40, r: 40, t: 40, b: 40},
      xaxis: Object.assign({}, axis, {title: {text: 'predicted ' + (grouped ? D.group_kind : 'class')}, tickangle: -90,
                                      range: [-0.5, m - 0.5], constrain: 'domain'}),
      yaxis: Object.assign({}, axis, {title: {text: 'true ' + (grouped ? D.group_kind : 'class')}, autorange: false,
                                      range: [m - 0.5, -0.5], scaleanchor: 'x', constrain: 'domain'})
    }, D.config);
    showing.textContent = view.label + ' (' + m + ' ' + (grouped ? plural(D.group_kind) : 'classes') + ')';
  }

  // ---- the scope menu, the search box
  var scopes = [];
  if (n <= D.all_max) scopes.push(['all', 'all ' + n + ' classes']);
  D.top_n.forEach(function (N) { if (N < n) scopes.push(['top' + N, 'top ' + N + ' most confused']); });
  if (groupIds.length > 1) scopes.push(['groups', 'by ' + D.group_kind + ' (' + groupIds.length + ')']);
  scopes.forEach(function (s) {
    var o = document.createElement('option'); o.value = s[0]; o.textContent = s[1]; scope.appendChild(o);
  });
  function applyScope() {
    var s = scope.value;
    if (s === 'all') setView('classes', inOrder(allIds()), 'all classes');
    else if (s === 'groups') setView('groups', groupIds.slice(), 'collapsed by ' + D.group_kind + '; click a cell to open its classes');
    else setView('classes', topN(+s.slice(3)), 'the ' + s.slice(3) + ' classes with the most confusions');
  }
  scope.value = D.default_scope;
  scope.addEventListener('change', function () { search.value = ''; applyScope(); });
  colour.addEventListener('change', draw);
  var datalist = document.getElementById('cm-names');
  D.names.forEach(function (name) { var o = document.createElement('option'); o.value = name; datalist.appendChild(o); });
  function find() {
    var q = search.value.trim().toLowerCase();
    if (!q) { applyScope(); return; }
    var exact = D.names.findIndex(function (s) { return s.toLowerCase() === q; });
    var hits = exact >= 0 ? [exact] : allIds().filter(function (i) { return D.names[i].toLowerCase().indexOf(q) >= 0; });
    if (!hits.length) { showing.textContent = 'no class name contains "' + search.value + '"'; return; }
    if (hits.length === 1) setView('classes', partners(hits[0], D.partners), D.names[hits[0]] + ' and the classes it is confused with');
    else setView('classes', inOrder(hits.slice(0, D.top_n[D.top_n.length - 1])), 'classes matching "' + search.value + '"');
  }
  search.addEventListener('change', find);
  search.addEventListener('keydown', function (e) { if (e.key === 'Enter') find(); });

  // ---- a cell's images
  var sheets = {};
  function sheet(s) {
    if (!sheets[s]) {
      sheets[s] = new Promise(function (resolve, reject) {
        var img = new Image();
        img.onload = function () { resolve(img); };
        img.onerror = reject;
        var holder = document.getElementById('cell-sheet-' + s);
        if (!holder) { reject(new Error('no tile sheet ' + s)); return; }
        img.src = holder.textContent.trim();
      });
    }
    return sheets[s];
  }
  var T = D.tiles;
  function drawTile(canvas, g) {
    var s = Math.floor(g / T.per_sheet), local = g % T.per_sheet;
    var tw = 3 * T.w, sx = (local % T.per_row) * tw, sy = Math.floor(local / T.per_row) * T.h;
    sheet(s).then(function (img) {
      canvas.getContext('2d').drawImage(img, sx, sy, tw, T.h, 0, 0, tw, T.h);
      canvas.setAttribute('data-drawn', '1');
    }).catch(function () { canvas.setAttribute('data-drawn', 'failed'); });
  }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  var panel = document.getElementById('cell-images');
  function showCell(t, p) {
    panel.textContent = '';
    panel.appendChild(el('div', 'cell-title', D.names[t] + ' → ' + D.names[p]));
    var i = cellOf.get(t * n + p);
    if (i === undefined) {
      panel.appendChild(el('p', 'note', 'No image of ' + D.names[t] + ' was predicted as ' + D.names[p] + '.'));
      return;
    }
    var cnt = D.cells[5 * i + 2], off = D.cells[5 * i + 3], shown = D.cells[5 * i + 4];
    var share = D.support[t] ? ' (' + (100 * cnt / D.support[t]).toFixed(1) + '% of ' + D.names[t] + ')' : '';
    var note = cnt + ' image' + (cnt === 1 ? '' : 's') + share + '. ';
    if (!shown && D.images_note) note += D.images_note;
    else if (!shown && !(D.per_cell && D.budget && T.h)) note += 'Cell images are off in this run (CELL_IMAGES=0, CELL_IMAGES_MAX=0, or no CAMs).';
    else if (!shown) note += 'Not in this page: the ' + D.budget + ' images of CELL_IMAGES_MAX went to larger cells; raise it to include this one.';
    else note += (shown < cnt ? 'The ' + shown + ' worst' : 'All') + ', most confident in ' + D.names[p] +
                 ' first. Each: the image, the CAM for the true class, the CAM for the predicted class.';
    panel.appendChild(el('p', 'note', note));
    var grid = el('div', 'cell-grid'), scale = Math.max(1, Math.floor(96 / T.h));
    for (var j = 0; j < shown; j++) {
      var g = off + j, item = el('figure', 'cell-item'), canvas = el('canvas', 'cell-tile');
      canvas.width = 3 * T.w; canvas.height = T.h;
      canvas.style.width = (3 * T.w * scale) + 'px'; canvas.style.height = (T.h * scale) + 'px';
      canvas.title = 'image · CAM for ' + D.names[t] + ' · CAM for ' + D.names[p];
      item.appendChild(canvas);
      item.appendChild(el('figcaption', '', '#' + D.images.idx[g] + ' · p(' + D.names[p] + ') ' +
        D.images.p_pred[g].toFixed(2) + ' · p(' + D.names[t] + ') ' + D.images.p_true[g].toFixed(2)));
      grid.appendChild(item);
      drawTile(canvas, g);
    }
    panel.appendChild(grid);
  }
  window.cmShowCell = showCell;
  applyScope();   // the first draw gives the div Plotly's .on()
  plot.on('plotly_click', function (ev) {
    var pt = ev.points[0], r = pt.y, q = pt.x;
    if (view.mode === 'groups') {
      var a = view.ids[r], b = view.ids[q], ids = members[a].concat(a === b ? [] : members[b]);
      setView('classes', inOrder(ids), D.group_labels_plain[a] + (a === b ? '' : ' and ' + D.group_labels_plain[b]));
      return;
    }
    var t = view.ids[r], p = view.ids[q];
    if (t === p) {
      panel.textContent = '';
      panel.appendChild(el('div', 'cell-title', D.names[t] + ': ' + D.correct[t] + ' of ' + D.support[t] + ' correct'));
      panel.appendChild(el('p', 'note', 'The diagonal holds the correct predictions: click a cell off it for errors, ' +
                                        'or see this class’s gallery in worst_predictions/ (drawn for the CLASS_GALLERIES weakest classes).'));
      return;
    }
    showCell(t, p);
  });
  // the pairs table comes later in the page: one listener on the document serves its rows
  document.addEventListener('click', function (ev) {
    var tr = ev.target.closest('tr[data-true]');
    if (!tr || ev.target.closest('a')) return;   // its links open their files
    showCell(+tr.getAttribute('data-true'), +tr.getAttribute('data-pred'));
    panel.scrollIntoView({block: 'nearest'});
  });
})();
